"""Check helpers shared by the SDK compatibility scripts: stop at the first failure with
"FAILED: …", count the checks that passed, and print "OK <n> checks" at the end."""

from cmq.cmq_exception import CMQServerException

_passed = 0


def check(cond, what):
    global _passed
    if not cond:
        raise SystemExit("FAILED: " + what)
    _passed += 1


def expect_code(code, fn, what):
    try:
        fn()
    except CMQServerException as e:
        check(e.code == code, "%s: expected code %d, got %d (%s)" % (what, code, e.code, e.message))
        return
    check(False, "%s: expected code %d, got success" % (what, code))


def done():
    print("OK %d checks" % _passed)
