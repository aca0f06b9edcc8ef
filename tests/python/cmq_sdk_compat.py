"""Drives a real Meridian region through Tencent's official CMQ Python SDK (qcloud-cmq-sdk-py3).

Usage: cmq_sdk_compat.py HOST SECRET_ID SECRET_KEY OTHER_TENANT_ID OTHER_TENANT_KEY
Run it from a scratch directory: the SDK writes CMQ_python_sdk.log into its working directory.
The queue `dlq-src` (visibilityTimeout 1, dead-letter policy maxReceiveCount 1 into `dlq-dst`)
is created beforehand by the test driver over gRPC, because the SDK cannot set the policy.
Exits non-zero with a message on the first failed check.
"""

import sys
import threading
import time

from cmq.account import Account
from cmq.queue import Message, QueueMeta

from sdk_checks import check, done, expect_code

HOST, SID, SKEY, SID2, SKEY2 = sys.argv[1:6]


def meta(**attrs):
    m = QueueMeta()
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


acct = Account(HOST, SID, SKEY)

# --- queue management ---
q = acct.get_queue("sdk-orders")
q.create(meta(visibilityTimeout=5, pollingWaitSeconds=0))
expect_code(4460, lambda: acct.get_queue("SDK-ORDERS").create(QueueMeta()), "duplicate name, case-insensitive")
expect_code(4000, lambda: acct.get_queue("9bad").create(QueueMeta()), "invalid name")
for i in range(3):
    acct.get_queue("sdk-list-%d" % i).create(QueueMeta())
total, names, _ = acct.list_queue("sdk-list")
check(total == 3 and len(names) == 3, "list with searchWord: %r" % (names,))
total, page, next_offset = acct.list_queue("sdk-list", 2, 0)
check(total == 3 and len(page) == 2, "list paging: %r %r" % (page, next_offset))
a = q.get_attributes()
check(a.visibilityTimeout == 5 and a.maxMsgSize == 65536 and a.msgRetentionSeconds == 345600, "attributes")
check(a.createTime > 1_600_000_000 and a.activeMsgNum == 0, "createTime / activeMsgNum")
q.set_attributes(meta(visibilityTimeout=7, maxMsgSize=2048))
a = q.get_attributes()
check(a.visibilityTimeout == 7 and a.maxMsgSize == 2048, "set attributes: %d %d" % (a.visibilityTimeout, a.maxMsgSize))
acct.get_queue("sdk-list-2").delete()
expect_code(4440, lambda: acct.get_queue("sdk-list-2").get_attributes(), "deleted queue")

# --- send, receive, delete; Chinese text and @-prefixed bodies (signature quirk) ---
bodies = ["hello 世界 & =+%/", "@starts-with-at", "plain"]
ids = [q.send_message(Message(b)).msgId for b in bodies]
check(len(set(ids)) == 3, "distinct msgIds")
got = {}
for _ in range(3):
    m = q.receive_message(2)
    got[m.msgId] = m.msgBody
    check(m.dequeueCount == 1 and m.enqueueTime > 0 and m.nextVisibleTime >= m.enqueueTime, "message fields")
    q.delete_message(m.receiptHandle)
check(sorted(got.values()) == sorted(bodies), "bodies round-trip: %r" % (got,))
expect_code(7000, lambda: q.receive_message(0), "empty queue")
expect_code(4400, lambda: q.send_message(Message("x" * 2049)), "over maxMsgSize")

# --- batch send, batch receive, batch delete with a partial failure ---
sent = q.batch_send_message([Message("b%d" % i) for i in range(5)])
check(len(sent) == 5, "batch send ids")
msgs = q.batch_receive_message(16, 2)
check(len(msgs) == 5, "batch receive: %d" % len(msgs))
handles = [m.receiptHandle for m in msgs[:2]]
q.batch_delete_message(handles)
expect_code(6010, lambda: q.batch_delete_message([m.receiptHandle for m in msgs[2:]] + ["bogus-handle"]),
            "batch delete partial failure")
expect_code(7000, lambda: q.receive_message(0), "all deleted")

# --- long poll returns as soon as a message arrives ---
def late_send():
    time.sleep(1.0)
    Account(HOST, SID, SKEY).get_queue("sdk-orders").send_message(Message("late"))

t = threading.Thread(target=late_send)
start = time.time()
t.start()
m = q.receive_message(25)
elapsed = time.time() - start
t.join()
check(m.msgBody == "late", "long poll body")
check(elapsed < 20, "long poll woke on arrival, not at its 25 s deadline (%.1f s)" % elapsed)
q.delete_message(m.receiptHandle)

# --- delay ---
q.send_message(Message("delayed"), 2)
expect_code(7000, lambda: q.receive_message(0), "delayed message invisible")
check(q.get_attributes().delayMsgNum == 1, "delayMsgNum")
m = q.receive_message(10)
check(m.msgBody == "delayed", "delayed message arrives")
q.delete_message(m.receiptHandle)

# --- visibility timeout expiry ---
v = acct.get_queue("sdk-vis")
v.create(meta(visibilityTimeout=1))
v.send_message(Message("again"))
first = v.receive_message(0)
expect_code(7000, lambda: v.receive_message(0), "invisible while in flight")
check(v.get_attributes().inactiveMsgNum == 1, "inactiveMsgNum")
time.sleep(1.5)
second = v.receive_message(5)
check(second.msgId == first.msgId and second.dequeueCount == 2, "redelivered after visibility timeout")
expect_code(4430, lambda: v.delete_message(first.receiptHandle), "stale receipt handle")
v.delete_message(second.receiptHandle)

# --- rewind ---
r = acct.get_queue("sdk-rewind")
r.create(meta(rewindSeconds=3600))
start = int(time.time()) - 1
r.send_message(Message("ledger"))
m = r.receive_message(2)
r.delete_message(m.receiptHandle)
check(r.get_attributes().rewindmsgNum == 1, "rewindmsgNum")
r.rewindQueue(start)
again = r.receive_message(2)
check(again.msgId == m.msgId and again.msgBody == "ledger", "rewind re-delivers")
expect_code(6050, lambda: q.rewindQueue(start), "rewind disabled")

# --- dead-lettering (policy set up over gRPC) ---
src = acct.get_queue("dlq-src")
src.send_message(Message("poison"))
src.receive_message(2)
time.sleep(1.5)
expect_code(7000, lambda: src.receive_message(0), "dead-lettered instead of redelivered")
dead = acct.get_queue("dlq-dst").receive_message(10)
check(dead.msgBody == "poison", "message reached the dead-letter queue")

# --- HmacSHA256 and GET ---
acct256 = Account(HOST, SID, SKEY)
acct256.set_sign("sha256")
q256 = acct256.get_queue("sdk-orders")
q256.send_message(Message("signed with sha256"))
check(q256.receive_message(2).msgBody == "signed with sha256", "HmacSHA256")
acct_get = Account(HOST, SID, SKEY)
acct_get.get_client().set_method("GET")
check(acct_get.list_queue("sdk-orders")[0] == 1, "GET requests")

# --- wrong key, unknown id ---
expect_code(4100, lambda: Account(HOST, SID, SKEY + "x").list_queue(), "wrong SecretKey")
expect_code(4100, lambda: Account(HOST, "AKIDnobody", SKEY).list_queue(), "unknown SecretId")

# --- tenant isolation ---
other = Account(HOST, SID2, SKEY2)
total, _, _ = other.list_queue()
check(total == 0, "other tenant sees no queues (%d)" % total)
expect_code(4440, lambda: other.get_queue("sdk-orders").get_attributes(), "other tenant cannot read")
expect_code(4440, lambda: other.get_queue("sdk-orders").send_message(Message("x")), "other tenant cannot send")
other.get_queue("sdk-orders").create(QueueMeta())
check(other.list_queue()[0] == 1, "same name in another tenant")
check(acct.list_queue("sdk-orders")[0] == 1, "first tenant unaffected")

done()
