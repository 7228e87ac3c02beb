-- miltertest script for examples/attachment_filter.py (see header_tagger.lua
-- for how it is run): an attachment renamed in a new body, a message that is
-- an attachment itself (its headers change, not its body), a clean message.

dofile("common.lua")

-- One message per connection: mt.eom_check sees the changes of every earlier
-- message of the connection too (nothing clears them with this milter's steps).
local function send(headers, body)
    local conn = open()
    for _, field in ipairs(headers) do
        ok(mt.header(conn, field[1], field[2]), "mt.header(" .. field[1] .. ")")
    end
    ok(mt.eoh(conn), "mt.eoh()")
    ok(mt.bodystring(conn, body), "mt.bodystring()")
    ok(mt.eom(conn), "mt.eom()")
    expect(conn, SMFIR_CONTINUE, "eom")
    return conn
end

local MULTIPART = {
    {"Subject", "documents"},
    {"MIME-Version", "1.0"},
    {"Content-Type", "multipart/mixed;\n\tboundary=\"b1\""},
}

local function body(before, after)
    return "--b1\r\n"
        .. "Content-Type: text/plain\r\n\r\nHello\r\n"
        .. "--b1\r\n" .. (before or "")
        .. "Content-Transfer-Encoding: base64\r\n" .. (after or "")
        .. "\r\nTVqQAAMAAAAEAAAA\r\n"
        .. "--b1--\r\n"
end

local function main()
    local conn = open()
    for _, action in ipairs({SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_CHGBODY}) do
        check(mt.test_action(conn, action), "action requested: " .. action)
    end
    for _, step in ipairs({SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT}) do
        check(mt.test_option(conn, step), "unhandled stage not disabled: " .. step)
    end
    check(not mt.test_option(conn, SMFIP_NOHDRS) and not mt.test_option(conn, SMFIP_NOBODY),
          "headers and body wanted")
    ok(mt.disconnect(conn), "mt.disconnect()")

    -- A multipart message: the executable renamed in a new body; the top-level
    -- headers (and the boundary in them) stay.
    conn = send(MULTIPART, body("Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n"))
    -- The renamed part's new Content-Type and Content-Disposition come last.
    check(mt.eom_check(conn, MT_BODYCHANGE, body(nil,
              "Content-Type: application/octet-stream; name=\"invoice.pdf.exe.blocked\"\r\n"
              .. "Content-Disposition: attachment; filename=\"invoice.pdf.exe.blocked\"\r\n")),
          "body replaced, only the attachment's headers changed")
    check(mt.eom_check(conn, MT_HDRADD, "X-Attachment-Filter", "renamed 1 (invoice.pdf.exe)"),
          "X-Attachment-Filter added")
    check(not mt.eom_check(conn, MT_HDRCHANGE), "no header changed")
    ok(mt.disconnect(conn), "mt.disconnect()")

    -- A message that is an executable: its headers change, its body does not.
    conn = send({
        {"Subject", "tool"},
        {"Content-Type", "application/x-msdownload; name=tool.exe"},
        {"Content-Transfer-Encoding", "base64"},
    }, "TVqQAAMAAAAEAAAA\r\n")
    check(mt.eom_check(conn, MT_HDRCHANGE, "Content-Type",
                       "application/octet-stream; name=\"tool.exe.blocked\""),
          "Content-Type replaced")
    check(mt.eom_check(conn, MT_HDRADD, "Content-Disposition",
                       "attachment; filename=\"tool.exe.blocked\""),
          "Content-Disposition added")
    check(mt.eom_check(conn, MT_HDRADD, "MIME-Version", "1.0"), "MIME-Version added")
    check(mt.eom_check(conn, MT_HDRADD, "X-Attachment-Filter", "renamed 1 (tool.exe)"),
          "X-Attachment-Filter added")
    check(not mt.eom_check(conn, MT_BODYCHANGE), "body unchanged")
    ok(mt.disconnect(conn), "mt.disconnect()")

    -- A clean message: one header, nothing else.
    conn = send(MULTIPART, body("Content-Type: application/pdf; name=\"report.pdf\"\r\n"))
    check(mt.eom_check(conn, MT_HDRADD, "X-Attachment-Filter", "clean"), "tagged clean")
    check(not mt.eom_check(conn, MT_BODYCHANGE), "body unchanged")
    check(not mt.eom_check(conn, MT_HDRCHANGE), "no header changed")
    ok(mt.disconnect(conn), "mt.disconnect()")
end

run(main)
