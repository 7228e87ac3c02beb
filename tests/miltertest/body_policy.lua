-- miltertest script for examples/body_policy.py (see header_tagger.lua for
-- how it is run): SKIP once forbidden content is seen, rejections with
-- custom replies, size and hash headers otherwise.

dofile("common.lua")

local EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"

local function message(conn, subject)
    ok(mt.mailfrom(conn, "<sender@example.test>"), "mt.mailfrom()")
    expect(conn, SMFIR_CONTINUE, "mail")
    ok(mt.header(conn, "Subject", subject), "mt.header()")
    expect(conn, SMFIR_CONTINUE, "header")
end

local function main()
    local conn = open()
    check(mt.test_option(conn, SMFIP_SKIP), "SKIP requested")
    check(mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS requested")
    check(mt.test_option(conn, SMFIP_NORCPT), "RCPT not wanted")

    -- Forbidden content: SKIP right away, then the custom 554 at the end.
    message(conn, "hello")
    ok(mt.eoh(conn), "mt.eoh()")
    expect(conn, SMFIR_CONTINUE, "eoh")
    ok(mt.bodystring(conn, "an innocent first chunk\r\n"), "mt.bodystring()")
    expect(conn, SMFIR_CONTINUE, "body chunk 1")
    ok(mt.bodystring(conn, "before\r\n" .. EICAR .. "after\r\n"), "mt.bodystring()")
    expect(conn, SMFIR_SKIP, "body chunk 2 (forbidden content)")
    ok(mt.eom(conn), "mt.eom()")
    expect(conn, SMFIR_REPLYCODE, "eom (forbidden content)")
    check(mt.eom_check(conn, MT_SMTPREPLY, "554", "5.7.1",
                       "Message refused: forbidden content"), "554 reply")
    check(not mt.eom_check(conn, MT_HDRADD), "no header added to a refused message")
    ok(mt.abort(conn), "mt.abort()")

    -- Forbidden subject: refused at end of headers.
    message(conn, "BUY NOW, cheap")
    ok(mt.eoh(conn), "mt.eoh()")
    expect(conn, SMFIR_REPLYCODE, "eoh (forbidden subject)")
    ok(mt.abort(conn), "mt.abort()")

    -- An ordinary message: size and SHA-256 of the body as headers.
    message(conn, "fine")
    ok(mt.eoh(conn), "mt.eoh()")
    expect(conn, SMFIR_CONTINUE, "eoh")
    ok(mt.bodystring(conn, "hel"), "mt.bodystring()")
    expect(conn, SMFIR_CONTINUE, "body chunk 1")
    ok(mt.bodystring(conn, "lo\r\n"), "mt.bodystring()")
    expect(conn, SMFIR_CONTINUE, "body chunk 2")
    ok(mt.eom(conn), "mt.eom()")
    expect(conn, SMFIR_CONTINUE, "eom")
    check(mt.eom_check(conn, MT_HDRADD, "X-Body-Size", "7"), "X-Body-Size")
    check(mt.eom_check(conn, MT_HDRADD, "X-Body-SHA256",
          "cd2eca3535741f27a8ae40c31b0c41d4057a7a7b912b33b9aed86485d1c84676"),
          "X-Body-SHA256 of \"hello\\r\\n\"")
    ok(mt.disconnect(conn), "mt.disconnect()")
end

run(main)
