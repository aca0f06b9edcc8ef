"""Drives the topic API of a real Meridian region through Tencent's official CMQ Python SDK
(qcloud-cmq-sdk-py3): topic and subscription management, tag filtering, routing keys, fan-out
into queues, and HTTP push to a receiver this script runs itself on 127.0.0.1.

Usage: cmq_topic_compat.py HOST SECRET_ID SECRET_KEY
Run it from a scratch directory: the SDK writes CMQ_python_sdk.log into its working directory.
Exits non-zero with a message on the first failed check.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cmq.account import Account
from cmq.cmq_exception import CMQServerException
from cmq.queue import QueueMeta
from cmq.subscription import SubscriptionMeta
from cmq.topic import Message, TopicMeta

from sdk_checks import check, done, expect_code

HOST, SID, SKEY = sys.argv[1:4]


def eventually(cond, seconds, what, pause=0.25, seen=None):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(pause)
    ok = cond()
    check(ok, "%s (waited %d s)%s" % (what, seconds, "" if ok or seen is None else "; saw %r" % (seen(),)))


def topic_meta(**attrs):
    m = TopicMeta()
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def sub_meta(protocol, endpoint, fmt, tags=(), keys=(), strategy=None):
    m = SubscriptionMeta()
    m.Protocal = protocol  # sic: the SDK's spelling
    m.Endpoint = endpoint
    # The SDK always sends notifyContentFormat (default JSON), so queue subscriptions must say SIMPLIFIED.
    m.NotifyContentFormat = fmt
    m.FilterTag = list(tags)
    m.bindingKey = list(keys)
    if strategy:
        m.NotifyStrategy = strategy
    return m


def make_queue(name):
    q = acct.get_queue(name)
    qm = QueueMeta()
    qm.pollingWaitSeconds = 0
    q.create(qm)
    return q


def receive(queue, wait):
    try:
        return queue.receive_message(wait)
    except CMQServerException as e:
        if e.code == 7000:
            return None
        raise


def drain(queue, expected, what):
    """Receives and deletes until the expected number of bodies arrived (fan-out may lag the
    publish), then until the queue stays empty, and compares the multiset of bodies."""
    bodies = []
    # Generous: a bound on a loaded 2-core CI machine, not a speed check.
    deadline = time.time() + 60
    while len(bodies) < len(expected) and time.time() < deadline:
        m = receive(queue, 3)
        if m is not None:
            bodies.append(m.msgBody)
            queue.delete_message(m.receiptHandle)
    for _ in range(50):
        m = receive(queue, 1)
        if m is None:
            break
        bodies.append(m.msgBody)
        queue.delete_message(m.receiptHandle)
    check(sorted(bodies) == sorted(expected), "%s: got %r, expected %r" % (what, sorted(bodies), sorted(expected)))


def raw_topic_attrs(name):
    return acct.get_client().get_topic_attributes({"topicName": name})


def raw_sub_attrs(topic, sub):
    # The SDK's Subscription.get_attributes drops `protocol` (it reads `protocal`) and stores
    # `endpoint` in a stray attribute, so the server's own field names are checked on the raw reply.
    return acct.get_client().get_subscription_attributes({"topicName": topic, "subscriptionName": sub})


# --- local push receiver ---
posts = []  # (path, {lower-case header: value}, body bytes), in arrival order
posts_lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        body = self.read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        with posts_lock:
            posts.append((self.path, headers, body))
            flaky_seen = sum(1 for p in posts if p[0].startswith("/flaky/"))
        if self.path.startswith("/ok/"):
            status = 200
        elif self.path.startswith("/flaky/"):
            status = 500 if flaky_seen <= 2 else 200
        else:
            status = 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=receiver.serve_forever, daemon=True).start()
PUSH_BASE = "http://127.0.0.1:%d" % receiver.server_address[1]


def posts_to(path):
    with posts_lock:
        return [p for p in posts if p[0] == path]


acct = Account(HOST, SID, SKEY)

# --- topic management ---
tags = acct.get_topic("sdk-tags")
tags.create(TopicMeta())
routes = acct.get_topic("sdk-routes")
routes.create(topic_meta(filterType=2))
expect_code(4460, lambda: acct.get_topic("SDK-TAGS").create(TopicMeta()), "duplicate topic name, case-insensitive")
expect_code(4000, lambda: acct.get_topic("9bad").create(TopicMeta()), "invalid topic name")

# TopicMeta defaults maxMsgSize to 65536 and filterType to 1, so the SDK view alone would not
# notice a server that omitted them.
raw = raw_topic_attrs("sdk-tags")
missing = [k for k in ("msgCount", "maxMsgSize", "msgRetentionSeconds", "createTime", "lastModifyTime", "filterType")
           if k not in raw]
check(not missing, "GetTopicAttributes fields missing: %r" % (missing,))
a = tags.get_attributes()
check(a.maxMsgSize == 65536 and a.msgRetentionSeconds == 86400 and a.filterType == 1,
      "topic attributes: %d %d %d" % (a.maxMsgSize, a.msgRetentionSeconds, a.filterType))
check(a.createTime > 1_600_000_000 and a.msgCount == 0, "topic createTime / msgCount: %r %r" % (a.createTime, a.msgCount))
check(routes.get_attributes().filterType == 2, "routing topic filterType")
tags.set_attributes(topic_meta(maxMsgSize=4096))
check(tags.get_attributes().maxMsgSize == 4096, "set topic maxMsgSize")
expect_code(4400, lambda: tags.publish_message(Message("x" * 4097)), "publish over maxMsgSize")

total, listed, _ = acct.list_topic("sdk-")
check(total == 2 and sorted(t.get("topicName") for t in listed) == ["sdk-routes", "sdk-tags"],
      "list_topic with searchWord: %r %r" % (total, listed))
total, page, next_offset = acct.list_topic("sdk-", 1, 0)
check(total == 2 and len(page) == 1 and next_offset == 1, "list_topic paging: %r %r" % (page, next_offset))
expect_code(4440, lambda: acct.get_topic("sdk-nothing").get_attributes(), "missing topic")

# --- queue subscriptions with tag filtering ---
tq_a, tq_b, tq_all = make_queue("tq-a"), make_queue("tq-b"), make_queue("tq-all")
acct.get_subscription("sdk-tags", "sub-a").create(sub_meta("queue", "tq-a", "SIMPLIFIED", tags=["a"]))
acct.get_subscription("sdk-tags", "sub-b").create(sub_meta("queue", "tq-b", "SIMPLIFIED", tags=["b"]))
acct.get_subscription("sdk-tags", "sub-all").create(sub_meta("queue", "tq-all", "SIMPLIFIED"))
expect_code(4000, lambda: acct.get_subscription("sdk-tags", "sub-json").create(sub_meta("queue", "tq-a", "JSON")),
            "queue subscription with JSON format")
expect_code(4490, lambda: acct.get_subscription("sdk-tags", "sub-a").create(
    sub_meta("queue", "tq-a", "SIMPLIFIED", tags=["a"])), "duplicate subscription")
expect_code(4440, lambda: acct.get_subscription("sdk-tags", "sub-ghost").create(
    sub_meta("queue", "no-such-queue", "SIMPLIFIED")), "subscription to a missing queue")

for body, msg_tags in [("m-a", ["a"]), ("m-b", ["b"]), ("m-ab", ["a", "b"]), ("m-none", [])]:
    check(tags.publish_message(Message(body, msg_tags)).msgId, "publish %s returns a msgId" % body)
drain(tq_a, ["m-a", "m-ab"], "tq-a (filterTag a)")
drain(tq_b, ["m-b", "m-ab"], "tq-b (filterTag b)")
drain(tq_all, ["m-a", "m-b", "m-ab", "m-none"], "tq-all (no filterTag)")

sent = tags.batch_publish_message([Message("bb-%d" % i) for i in range(3)], ["b"])
check(len(sent) == 3 and all(m.msgId for m in sent), "batch publish ids: %r" % ([m.msgId for m in sent],))
batch = ["bb-0", "bb-1", "bb-2"]
drain(tq_b, batch, "tq-b after batch publish")
drain(tq_all, batch, "tq-all after batch publish")
drain(tq_a, [], "tq-a after batch publish tagged b")
expect_code(4000, lambda: tags.publish_message(Message("x", ["t1", "t2", "t3", "t4", "t5", "t6"])),
            "more than 5 msgTags")

# --- routing keys ---
rqs = {}
for n, keys in [(1, ["1.*.0"]), (2, ["1.#.0"]), (3, ["#"]), (4, ["x.y"])]:
    rqs[n] = make_queue("rq-%d" % n)
    acct.get_subscription("sdk-routes", "rs-%d" % n).create(sub_meta("queue", "rq-%d" % n, "SIMPLIFIED", keys=keys))
for key in ["1.2.0", "1.2.3.4.0", "1.0", "x.y", "z"]:
    routes.publish_message(Message("key " + key), key)
drain(rqs[1], ["key 1.2.0"], "rq-1 (1.*.0)")
# '#' matches one or more words, as the CMQ doc says, so 1.#.0 does not match 1.0.
drain(rqs[2], ["key 1.2.0", "key 1.2.3.4.0"], "rq-2 (1.#.0)")
drain(rqs[3], ["key 1.2.0", "key 1.2.3.4.0", "key 1.0", "key x.y", "key z"], "rq-3 (#)")
drain(rqs[4], ["key x.y"], "rq-4 (x.y)")
expect_code(4000, lambda: routes.publish_message(Message("x"), ".".join(["w"] * 17)), "routing key with 16 dots")
expect_code(4000, lambda: routes.publish_message(Message("x")), "routing topic without routingKey")

# --- publish with nobody listening is accepted and goes nowhere ---
lonely = acct.get_topic("sdk-lonely")
lonely.create(TopicMeta())
mid = lonely.publish_message(Message("nobody listens")).msgId
check(isinstance(mid, str) and mid != "", "publish without subscriptions returns a msgId: %r" % (mid,))

# --- subscription management ---
total, subs, _ = tags.list_subscription()
check(total == 3 and {s.get("subscriptionName"): s.get("endpoint") for s in subs} == {"sub-a": "tq-a", "sub-b": "tq-b", "sub-all": "tq-all"},
      "list_subscription: %r %r" % (total, subs))
sub_a = acct.get_subscription("sdk-tags", "sub-a")
raw = raw_sub_attrs("sdk-tags", "sub-a")
check(raw.get("protocol") == "queue" and raw.get("endpoint") == "tq-a", "subscription protocol/endpoint: %r" % (raw,))
check(raw.get("notifyContentFormat") == "SIMPLIFIED" and raw.get("notifyStrategy") == "EXPONENTIAL_DECAY_RETRY",
      "subscription format/strategy: %r" % (raw,))
check(raw.get("filterTag") == ["a"] and raw.get("filterTags") == ["a"], "filterTag and filterTags: %r" % (raw,))
check("topicOwner" in raw and raw.get("createTime", 0) > 1_600_000_000 and raw.get("msgCount") == 0,
      "subscription topicOwner/createTime/msgCount: %r" % (raw,))
sm = sub_a.get_attributes()
check(sm.FilterTag == ["a"] and sm.NotifyContentFormat == "SIMPLIFIED",
      "SDK view of sub-a: %r %r" % (sm.FilterTag, sm.NotifyContentFormat))

sub_a.set_attributes(sub_meta("queue", "tq-a", "SIMPLIFIED", tags=["c"]))
check(sub_a.get_attributes().FilterTag == ["c"], "set filter tags")
check(raw_sub_attrs("sdk-tags", "sub-a").get("filterTag") == ["c"], "set filter tags (filterTag)")
sub_a.clearFilterTags()
check(sub_a.get_attributes().FilterTag == [], "clear filter tags")
raw = raw_sub_attrs("sdk-tags", "sub-a")
check(not raw.get("filterTag") and not raw.get("filterTags"), "no tags after clear: %r" % (raw,))
sub_a.delete()
total, subs, _ = tags.list_subscription()
check(total == 2 and sorted(s.get("subscriptionName") for s in subs) == ["sub-all", "sub-b"], "after unsubscribe: %r" % (subs,))
expect_code(4000, lambda: tags.delete(), "delete topic with subscriptions")
acct.get_subscription("sdk-tags", "sub-b").delete()
acct.get_subscription("sdk-tags", "sub-all").delete()
tags.delete()
expect_code(4440, lambda: tags.get_attributes(), "deleted topic")

# --- HTTP push ---
push = acct.get_topic("sdk-push")
push.create(TopicMeta())
acct.get_subscription("sdk-push", "push-json").create(sub_meta("http", PUSH_BASE + "/ok/json", "JSON"))
acct.get_subscription("sdk-push", "push-simple").create(sub_meta("http", PUSH_BASE + "/ok/simple", "SIMPLIFIED"))
acct.get_subscription("sdk-push", "push-flaky").create(
    sub_meta("http", PUSH_BASE + "/flaky/x", "JSON", strategy="EXPONENTIAL_DECAY_RETRY"))
expect_code(4000, lambda: acct.get_subscription("sdk-push", "push-ftp").create(
    sub_meta("http", "ftp://127.0.0.1/x", "JSON")), "http endpoint not starting with http://")
expect_code(4510, lambda: acct.get_subscription("sdk-push", "push-space").create(
    sub_meta("http", PUSH_BASE + "/ok/with space", "JSON")), "http endpoint containing a space")

push_id = push.publish_message(Message("hello push", ["t1", "t2"])).msgId
# Delivery speed is not under test: wait generously, judge only what arrived.
eventually(lambda: posts_to("/ok/json") and posts_to("/ok/simple") and len(posts_to("/flaky/x")) >= 3, 90,
           "pushes to /ok/json, /ok/simple and 3 attempts at /flaky/x", seen=lambda: [p[0] for p in posts])


def check_push_headers(headers, what):
    check(headers.get("user-agent") == "Qcloud Notification Service Agent", "%s User-Agent: %r" % (what, headers))
    check(headers.get("content-type", "").startswith("text/plain"), "%s Content-Type: %r" % (what, headers))
    check(headers.get("x-cmq-message-id") == push_id, "%s x-cmq-message-id %r != %r" % (what, headers, push_id))
    check(headers.get("x-cmq-request-id"), "%s x-cmq-request-id: %r" % (what, headers))
    check(headers.get("x-cmq-message-tag") == "t1, t2", "%s x-cmq-message-tag: %r" % (what, headers))


def check_json_body(body, sub_name):
    doc = json.loads(body)
    check(doc.get("topicName") == "sdk-push" and doc.get("subscriptionName") == sub_name, "%s names: %r" % (sub_name, doc))
    check(doc.get("msgId") == push_id and doc.get("msgBody") == "hello push", "%s msgId/msgBody: %r" % (sub_name, doc))
    pt = doc.get("publishTime")
    check(type(pt) is int and pt > 1_600_000_000, "%s publishTime in Unix seconds: %r" % (sub_name, doc))
    check("TopicOwner" in doc, "%s TopicOwner: %r" % (sub_name, doc))


_, headers, body = posts_to("/ok/json")[0]
check_push_headers(headers, "JSON push")
check_json_body(body, "push-json")
_, headers, body = posts_to("/ok/simple")[0]
check_push_headers(headers, "SIMPLIFIED push")
check(body == b"hello push", "SIMPLIFIED body is the raw message: %r" % (body,))
flaky = posts_to("/flaky/x")
check(all(h.get("x-cmq-message-id") == push_id for _, h, _ in flaky), "retries carry the same message")
_, headers, body = flaky[2]
check_push_headers(headers, "retried push")
check_json_body(body, "push-flaky")
eventually(lambda: raw_sub_attrs("sdk-push", "push-flaky").get("msgCount") == 0, 60,
           "push-flaky msgCount back to 0 after delivery", pause=0.5)

receiver.shutdown()
done()
