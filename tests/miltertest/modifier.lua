-- miltertest script for modifier.py (see header_tagger.lua for how it is
-- run): every end-of-message change, checked with mt.eom_check.

dofile("common.lua")

local function message(conn, subject)
    ok(mt.mailfrom(conn, "<sender@example.test>"), "mt.mailfrom()")
    expect(conn, SMFIR_CONTINUE, "mail")
    ok(mt.rcptto(conn, "<kept@example.test>"), "mt.rcptto()")
    ok(mt.rcptto(conn, "<removed@example.test>"), "mt.rcptto()")
    ok(mt.header(conn, "Subject", subject), "mt.header(Subject)")
    expect(conn, SMFIR_CONTINUE, "header Subject")
    ok(mt.header(conn, "X-Remove", "going away"), "mt.header(X-Remove)")
    expect(conn, SMFIR_CONTINUE, "header X-Remove")
    -- No end-of-headers or body handlers: those stages are negotiated away.
    check(mt.test_option(conn, SMFIP_NOEOH) and mt.test_option(conn, SMFIP_NOBODY),
          "EOH and BODY not wanted")
    ok(mt.eom(conn), "mt.eom()")
end

local function main()
    local conn = open()
    for _, action in ipairs({SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_ADDRCPT, SMFIF_DELRCPT,
                             SMFIF_CHGBODY, SMFIF_QUARANTINE}) do
        check(mt.test_action(conn, action), "action requested: " .. action)
    end
    check(not mt.test_action(conn, SMFIF_CHGFROM), "CHGFROM not requested")

    message(conn, "hello")
    expect(conn, SMFIR_CONTINUE, "eom")
    check(mt.eom_check(conn, MT_HDRADD, "X-Added", "added value"), "header added")
    check(mt.eom_check(conn, MT_HDRINSERT, "X-Inserted", "at the top", 0),
          "header inserted at index 0")
    check(not mt.eom_check(conn, MT_HDRINSERT, "X-Inserted", "at the top", 1),
          "MT_HDRINSERT compares the index")
    check(mt.eom_check(conn, MT_HDRCHANGE, "Subject", "[tagged] hello"), "Subject changed")
    check(mt.eom_check(conn, MT_HDRDELETE, "X-Remove"), "X-Remove deleted")
    check(not mt.eom_check(conn, MT_HDRDELETE, "Subject"), "Subject not deleted")
    check(mt.eom_check(conn, MT_RCPTADD, "<added@example.test>"), "recipient added")
    check(mt.eom_check(conn, MT_RCPTDELETE, "<removed@example.test>"), "recipient removed")
    check(mt.eom_check(conn, MT_BODYCHANGE, "the new body\r\n"), "body replaced")
    check(not mt.eom_check(conn, MT_QUARANTINE), "not quarantined")
    check(not mt.eom_check(conn, MT_SMTPREPLY, "550"), "no custom reply")
    ok(mt.abort(conn), "mt.abort()")

    message(conn, "quarantine")
    expect(conn, SMFIR_CONTINUE, "eom (quarantine)")
    check(mt.eom_check(conn, MT_QUARANTINE, "looks suspicious"), "quarantined with reason")
    check(not mt.eom_check(conn, MT_HDRADD), "no header added")
    check(not mt.eom_check(conn, MT_BODYCHANGE), "body unchanged")
    ok(mt.abort(conn), "mt.abort()")

    message(conn, "reject")
    expect(conn, SMFIR_REPLYCODE, "eom (reject)")
    check(mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "Not this one"), "custom 550 reply")
    check(not mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "Something else"),
          "MT_SMTPREPLY compares the text")
    check(not mt.eom_check(conn, MT_HDRADD), "no header added to a rejected message")
    ok(mt.disconnect(conn), "mt.disconnect()")
end

run(main)
