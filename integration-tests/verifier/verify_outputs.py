#!/usr/bin/env python3
"""An independent verifier of the processor's output topic: not the project's code, another client
(confluent-kafka, librdkafka through Python) and its own recomputation.

It reads the input topic and the output topic to their ends with isolation.level=read_committed, recomputes
per key the running aggregate {count, sum, min, max, chain} of the built-in job from the input in offset
order, and checks that the committed output sequence of every key is exactly that running sequence: the
i-th output of a key is its aggregate after its i-th input record. A repeated effect (an output seen
twice), a missing one, or a wrong value is a violation.

Prints one JSON object (keys, inputs, outputs, duplicates, missing, mismatched, ok, examples) and exits 0
when ok, 1 on a violation, 2 when it could not read the topics.

Usage: verify_outputs.py BROKERS INPUT_TOPIC OUTPUT_TOPIC
"""

import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

MASK = (1 << 64) - 1
CHAIN_MULTIPLIER = 1_099_511_628_211
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def read_all(brokers, topic, timeout_s=120):
    """Every committed record of `topic`, per partition in offset order: {partition: [(key, value)]}."""
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": "independent-verifier",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    metadata = consumer.list_topics(topic, timeout=30)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise RuntimeError(f"topic {topic} not found")
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records = {p: [] for p in partitions}
    at_end = set()
    deadline = time.monotonic() + timeout_s
    while len(at_end) < len(partitions):
        if time.monotonic() > deadline:
            raise RuntimeError(f"reading {topic} did not reach its end")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition())
                continue
            raise RuntimeError(f"reading {topic}: {message.error()}")
        at_end.discard(message.partition())
        records[message.partition()].append((message.key(), message.value()))
    consumer.close()
    return records


def parse_amount(value):
    """The built-in job's amount, or None for a record it sends to the dead letters."""
    try:
        text = value.decode("utf-8").strip()
        amount = int(text)
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None
    return amount if I64_MIN <= amount <= I64_MAX else None


def wrap_i64(n):
    n &= MASK
    return n - (1 << 64) if n > I64_MAX else n


def expected_sequences(inputs):
    """Per key, the list of running aggregates after each of its records, in offset order."""
    sequences = {}
    state = {}
    for records in inputs.values():
        for key, value in records:
            if key is None:
                continue
            amount = parse_amount(value)
            if amount is None:
                continue
            before = state.get(key)
            if before is None:
                after = {"count": 1, "sum": wrap_i64(amount), "min": amount, "max": amount,
                         "chain": amount & MASK}
            else:
                after = {
                    "count": before["count"] + 1,
                    "sum": wrap_i64(before["sum"] + amount),
                    "min": min(before["min"], amount),
                    "max": max(before["max"], amount),
                    "chain": (before["chain"] * CHAIN_MULTIPLIER + (amount & MASK)) & MASK,
                }
            state[key] = after
            sequences.setdefault(key, []).append(after)
    return sequences


def verify(brokers, input_topic, output_topic):
    expected = expected_sequences(read_all(brokers, input_topic))
    outputs = {}
    for records in read_all(brokers, output_topic).values():
        for key, value in records:
            outputs.setdefault(key, []).append(json.loads(value))
    report = {"keys": len(expected), "inputs": sum(len(s) for s in expected.values()),
              "outputs": sum(len(s) for s in outputs.values()), "duplicates": 0, "missing": 0,
              "mismatched": 0, "examples": []}
    for key in sorted(set(expected) | set(outputs), key=lambda k: k or b""):
        want = expected.get(key, [])
        got = outputs.get(key, [])
        name = key.decode("utf-8", "replace") if key else repr(key)
        seen_counts = set()
        for aggregate in got:
            count = aggregate.get("count")
            if count in seen_counts:
                report["duplicates"] += 1
                if len(report["examples"]) < 5:
                    report["examples"].append(f"{name}: count {count} published twice")
            seen_counts.add(count)
        report["missing"] += sum(1 for i in range(1, len(want) + 1) if i not in seen_counts)
        deduplicated = []
        for aggregate in got:
            if not deduplicated or aggregate["count"] > deduplicated[-1]["count"]:
                deduplicated.append(aggregate)
        for aggregate in deduplicated:
            count = aggregate["count"]
            if not 1 <= count <= len(want) or want[count - 1] != aggregate:
                report["mismatched"] += 1
                if len(report["examples"]) < 5:
                    report["examples"].append(f"{name}: output {aggregate} is not the recomputation")
        if len(got) != len(want) and len(report["examples"]) < 5 and not report["examples"]:
            report["examples"].append(f"{name}: {len(got)} outputs for {len(want)} inputs")
    report["ok"] = report["duplicates"] == 0 and report["missing"] == 0 and report["mismatched"] == 0
    return report


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        report = verify(argv[1], argv[2], argv[3])
    except Exception as err:  # noqa: BLE001 - one line for the caller, whatever failed
        print(json.dumps({"ok": False, "error": str(err)}))
        return 2
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
