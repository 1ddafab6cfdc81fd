"""scratch: buffers and memos reused within one session, nothing kept outside one."""

import torch

from dlbhooks import scratch


def test_buffer_outside_a_session_is_new_each_time():
    a = scratch.buffer("x", (3, 4), torch.float32, torch.device("cpu"))
    b = scratch.buffer("x", (3, 4), torch.float32, torch.device("cpu"))
    assert a.shape == (3, 4) and a.is_contiguous()
    assert a.data_ptr() != b.data_ptr()


def test_buffer_in_a_session_reuses_and_grows_one_block_per_key_and_dtype():
    cpu = torch.device("cpu")
    with scratch.session():
        a = scratch.buffer("x", (4, 5), torch.float32, cpu)
        smaller = scratch.buffer("x", (2, 3), torch.float32, cpu)
        assert smaller.data_ptr() == a.data_ptr() and smaller.shape == (2, 3)
        assert smaller.is_contiguous()
        other_key = scratch.buffer("y", (2, 3), torch.float32, cpu)
        other_dtype = scratch.buffer("x", (2, 3), torch.float64, cpu)
        assert len({a.data_ptr(), other_key.data_ptr(), other_dtype.data_ptr()}) == 3
        larger = scratch.buffer("x", (5, 5), torch.float32, cpu)
        assert larger.numel() == 25
        again = scratch.buffer("x", (4, 5), torch.float32, cpu)
        assert again.data_ptr() == larger.data_ptr()
        with scratch.session():  # nested: the outer session's blocks
            assert scratch.buffer("x", (1,), torch.float32, cpu).data_ptr() == larger.data_ptr()
    assert scratch._POOL.get() is None  # the blocks went with the session


def test_memo_keeps_one_value_per_key_for_the_same_unchanged_tensor_in_a_session():
    calls = []

    def make():
        calls.append(1)
        return len(calls)

    t, u = torch.zeros(3), torch.zeros(3)
    assert scratch.memo("k", t, make) == 1 and scratch.memo("k", t, make) == 2  # no session
    with scratch.session():
        assert scratch.memo("k", t, make) == 3
        assert scratch.memo("k", t, make) == 3  # the same tensor: kept
        assert scratch.memo("other", t, make) == 4  # another key
        assert scratch.memo("k", u, make) == 5  # an equal but different tensor: replaces
        assert scratch.memo("k", t, make) == 6  # (t's value was dropped)
        assert scratch.memo("other", t, make) == 4
        t.add_(1)  # modified: its version changed
        assert scratch.memo("k", t, make) == 7
    with scratch.session():  # a new session starts empty
        assert scratch.memo("k", t, make) == 8
