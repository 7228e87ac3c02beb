-- miltertest script for examples/recipient_policy.py (see header_tagger.lua
-- for how it is run): blocked recipients are refused one by one with a
-- custom reply, the others accepted.
--
-- The archive copy for <ceo@...> is added with SMFIR_ADDRCPT_PAR (address
-- plus NOTIFY=NEVER), which miltertest 1.6 reads but does not record for
-- eom_check(MT_RCPTADD); the Postfix end-to-end test checks it instead.

dofile("common.lua")

local function main()
    local conn = open()
    check(mt.test_action(conn, SMFIF_ADDRCPT_PAR), "ADDRCPT_PAR requested")
    check(not mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS not requested")
    check(not mt.test_option(conn, SMFIP_NOMAIL), "MAIL wanted")
    check(not mt.test_option(conn, SMFIP_NORCPT), "RCPT wanted")
    check(mt.test_option(conn, SMFIP_NOHDRS), "headers not wanted")
    check(mt.test_option(conn, SMFIP_NOBODY), "body not wanted")

    for message = 1, 2 do
        ok(mt.mailfrom(conn, "<sender@example.test>", "BODY=8BITMIME"), "mt.mailfrom()")
        expect(conn, SMFIR_CONTINUE, "mail")
        ok(mt.rcptto(conn, "<spamtrap@example.test>"), "mt.rcptto(spamtrap)")
        expect(conn, SMFIR_REPLYCODE, "rcpt spamtrap (custom multi-line 550)")
        ok(mt.rcptto(conn, "<bob@example.test>"), "mt.rcptto(bob)")
        expect(conn, SMFIR_CONTINUE, "rcpt bob")
        ok(mt.rcptto(conn, "<Former-Employee@Example.TEST>", "NOTIFY=NEVER"),
           "mt.rcptto(former-employee)")
        expect(conn, SMFIR_REPLYCODE, "rcpt former-employee (any case)")
        ok(mt.rcptto(conn, "<CEO@example.test>"), "mt.rcptto(ceo)")
        expect(conn, SMFIR_CONTINUE, "rcpt ceo")
        ok(mt.eom(conn), "mt.eom()")
        expect(conn, SMFIR_CONTINUE, "eom " .. message)
        check(not mt.eom_check(conn, MT_HDRADD), "no header added")
        check(not mt.eom_check(conn, MT_SMTPREPLY, "550"), "no custom reply at eom")
        check(not mt.eom_check(conn, MT_RCPTDELETE, "<bob@example.test>"), "no recipient removed")
        ok(mt.abort(conn), "mt.abort()")
    end
    ok(mt.disconnect(conn), "mt.disconnect()")
end

run(main)
