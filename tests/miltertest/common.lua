-- Helpers shared by the miltertest scripts in this directory (loaded with
-- dofile("common.lua"): run miltertest from this directory).  The global
-- `port` (miltertest -D port=PORT) names the milter's inet:PORT@127.0.0.1.

function check(condition, what)
    if not condition then error(what, 2) end
end

-- miltertest functions return nil on success, an error string on failure.
function ok(err, what)
    if err ~= nil then error(what .. " failed: " .. tostring(err), 2) end
end

function expect(conn, want, what)
    local got = mt.getreply(conn)
    if got ~= want then
        error(string.format("%s: reply %q, expected %q", what, string.char(got),
                            string.char(want)), 2)
    end
end

function open()
    check(port ~= nil, "run with -D port=PORT")
    local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.1)
    check(conn ~= nil, "mt.connect()")
    ok(mt.negotiate(conn, nil, nil, nil), "mt.negotiate()")
    return conn
end

-- Run `main`; on failure print "FAIL: ..." and exit 1 (miltertest itself
-- exits 1 on a script error without saying what it was).
function run(main)
    local passed, err = pcall(main)
    if not passed then
        io.stdout:write("FAIL: " .. tostring(err) .. "\n")
        io.stdout:flush()
        os.exit(1)
    end
    mt.echo("miltertest: all checks passed")
end
