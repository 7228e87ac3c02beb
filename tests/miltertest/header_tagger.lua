-- miltertest script for examples/header_tagger.py.
-- Run by test_miltertest.py, from this directory, as
--   miltertest -D port=PORT -s header_tagger.lua
-- with the example listening on inet:PORT@127.0.0.1.  Prints "FAIL: ..."
-- and exits non-zero when a check fails.

dofile("common.lua")

local function main()
    -- Negotiation: only CONNECT and EOM are handled; headers may be added.
    local conn = open()
    check(mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS requested")
    check(not mt.test_action(conn, SMFIF_ADDRCPT), "ADDRCPT not requested")
    check(not mt.test_option(conn, SMFIP_NOCONNECT), "CONNECT wanted")
    for _, step in ipairs({SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT, SMFIP_NOHDRS,
                           SMFIP_NOEOH, SMFIP_NOBODY, SMFIP_NOUNKNOWN, SMFIP_NODATA}) do
        check(mt.test_option(conn, step), "unhandled stage not disabled: " .. step)
    end

    ok(mt.conninfo(conn, "client.example", "192.0.2.7"), "mt.conninfo()")
    expect(conn, SMFIR_CONTINUE, "connect")

    -- Two messages on one connection: both tagged with the connection's client.
    for message = 1, 2 do
        ok(mt.eom(conn), "mt.eom()")
        expect(conn, SMFIR_CONTINUE, "eom " .. message)
        check(mt.eom_check(conn, MT_HDRADD, "X-Triomilter-Tagged",
                           "client.example [192.0.2.7]"),
              "tag header added in message " .. message)
        check(not mt.eom_check(conn, MT_HDRADD, "X-Triomilter-Tagged", "something else"),
              "eom_check compares values")
        check(mt.getheader(conn, "X-Triomilter-Tagged", 0) == "client.example [192.0.2.7]",
              "mt.getheader()")
        check(not mt.eom_check(conn, MT_BODYCHANGE), "body unchanged")
        check(not mt.eom_check(conn, MT_HDRCHANGE), "no header changed")
        ok(mt.abort(conn), "mt.abort()")
    end
    ok(mt.disconnect(conn), "mt.disconnect()")

    -- A client of an unknown address family.
    conn = open()
    ok(mt.conninfo(conn, "nowhere.example", "unspec"), "mt.conninfo(unspec)")
    expect(conn, SMFIR_CONTINUE, "connect (unspec)")
    ok(mt.eom(conn), "mt.eom()")
    expect(conn, SMFIR_CONTINUE, "eom (unspec)")
    check(mt.eom_check(conn, MT_HDRADD, "X-Triomilter-Tagged", "nowhere.example [unknown]"),
          "tag header for an unknown address")
    ok(mt.disconnect(conn), "mt.disconnect()")
end

run(main)
