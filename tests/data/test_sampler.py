from hypothesis import given, strategies as st

from ds_realloc.data.sampler import StepSampler, eval_shard, micro_batches, rank_slice


@given(st.integers(1, 200), st.integers(1, 32), st.integers(0, 10))
def test_each_epoch_visits_distinct_samples_and_order_is_a_function_of_step(n, batch, seed):
    if batch > n:
        return
    sampler = StepSampler(n, batch, seed)
    epoch = [i for step in range(sampler.steps_per_epoch) for i in sampler.global_batch(step)]
    assert len(epoch) == len(set(epoch)) == sampler.steps_per_epoch * batch
    assert StepSampler(n, batch, seed).global_batch(sampler.steps_per_epoch + 1) == sampler.global_batch(
        sampler.steps_per_epoch + 1)


@given(st.integers(1, 8), st.integers(1, 8))
def test_rank_slices_partition_the_global_batch(world, per_rank):
    batch = list(range(world * per_rank))
    slices = [rank_slice(batch, r, world) for r in range(world)]
    assert sum(slices, []) == batch and all(len(s) == per_rank for s in slices)


@given(st.integers(0, 100), st.integers(1, 8))
def test_eval_shards_are_equal_length_and_count_every_sample_once(n, world):
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    counted = [i for s in shards for i, ok in s if ok]
    assert sorted(counted) == list(range(n))


def test_micro_batches():
    assert micro_batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
