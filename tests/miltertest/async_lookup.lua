-- miltertest script for examples/async_lookup.py (see header_tagger.lua for
-- how it is run): the reputation looked up at connect ends up in a header.

dofile("common.lua")

local function tagged(host, address, reputation)
    local conn = open()
    ok(mt.conninfo(conn, host, address), "mt.conninfo()")
    expect(conn, SMFIR_CONTINUE, "connect " .. address)
    ok(mt.eom(conn), "mt.eom()")
    expect(conn, SMFIR_CONTINUE, "eom " .. address)
    check(mt.eom_check(conn, MT_HDRADD, "X-Client-Reputation", reputation),
          "X-Client-Reputation: " .. reputation .. " for " .. address)
    ok(mt.disconnect(conn), "mt.disconnect()")
end

local function main()
    tagged("blocked.example", "192.0.2.1", "listed: example blocklist")
    tagged("localhost", "127.0.0.1", "trusted (loopback)")
    tagged("other.example", "198.51.100.9", "unknown")
end

run(main)
