"""The restart policy: at once the first time, longer after each death, and a crash loop stops the run."""
from flowmeter.recovery import CRASH_LOOP, CRASH_WINDOW_S, RESTART_DELAYS_S, Restarts


def test_restarts_back_off_and_a_crash_loop_gives_up():
    r = Restarts()
    delays = [r.delay("worker-0", float(t)) for t in range(CRASH_LOOP)]
    assert delays == list(RESTART_DELAYS_S[:CRASH_LOOP]) and delays[0] == 0.0
    assert r.delay("worker-0", float(CRASH_LOOP)) is None  # one more within the minute: a loop
    assert r.delay("worker-1", float(CRASH_LOOP)) == 0.0  # each name has its own history
    assert r.delay("worker-0", CRASH_LOOP + CRASH_WINDOW_S) == RESTART_DELAYS_S[0]  # a quiet minute forgives


def test_incidents_say_what_happened_and_when_the_successor_came():
    r = Restarts()
    i = r.died("exporter", "killed by signal 9", 3.25)
    assert i.line() == "exporter killed by signal 9 at 3.2 s; not restarted"
    i.restart_s = 3.5
    assert i.line() == "exporter killed by signal 9 at 3.2 s; restarted 0.2 s later"
    assert r.count() == 1 and r.count("exporter") == 1 and r.count("worker-0") == 0
