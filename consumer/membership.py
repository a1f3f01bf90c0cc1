"""What a group member does when partitions leave it, the same for every driver (the live
worker, a shared replay's member): revoked, the finished work of those partitions is committed
while the generation is still ours, then the rest is dropped for the next owner to redo from
the committed offsets; lost (the session expired, a fenced member), nothing is committed, since
any commit would be refused. Where a new partition starts is inferlog/committed.py's."""
from __future__ import annotations


def let_go(consumer, partitions, engine, committer, *, commit_first: bool, closing: bool = False) -> tuple[set, int]:
    """Give up `partitions` (TopicPartitions) inside a revoke or lost callback. Returns the
    (topic, partition) keys gone and how many unreleased records of them were dropped."""
    gone = {(tp.topic, tp.partition) for tp in partitions}
    ours = gone & set(engine.partitions)
    if ours and commit_first and not closing:
        engine.collect()
        committer.step(force=True, only=ours)
    else:  # lost, or closing: nothing new is committed, but what is in flight ends first
        committer.settle()
    dropped = engine.revoke(ours)
    # librdkafka keeps a partition's pause across revocation (librdkafka#1849): one given up
    # while paused came back paused when it was assigned again (after a lost session, under
    # KIP-848), and was never fetched. Resuming a partition not paused is a no-op.
    consumer.resume(partitions)
    consumer.incremental_unassign(partitions)
    return gone, dropped
