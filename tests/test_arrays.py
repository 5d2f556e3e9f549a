"""numpy arrays as payloads (hiocluster.protocol.arrays): msgpack ext type 1,
equal on arrival (dtype, shape, contents) in-process and across processes,
hostile ext data refused with a FrameError."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from conftest import REPO
from hiocluster import protocol as proto
from hiocluster.supervision import supervisor
from hiocluster import Builder
from hiocluster.errors import FrameError
from hiocluster.node import Node

ARRAYS = [
    np.arange(12, dtype="<f8").reshape(3, 4),
    np.arange(6, dtype=">i4"),                       # big-endian stays big-endian
    np.array([True, False, True]),
    np.array([1 + 2j, 3 - 4j], dtype="<c16"),
    np.zeros((0, 3), dtype="<u2"),
    np.array(7.5),                                   # 0-d
    np.arange(20, dtype="<i8").reshape(4, 5)[:, 1:4],  # not contiguous
]


def through(value: Any) -> Any:
    frame = proto.Data(tick=0, source="w", messages=[[0, [0], [value]]], acks=[])
    return proto.decode_data(proto.encode(frame)).messages[0][2][0]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_an_array_arrives_equal(array: np.ndarray) -> None:
    back = through(array)
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype
    assert back.shape == array.shape and np.array_equal(back, array)
    assert back.flags.writeable


def test_numpy_scalars_travel_as_numbers_and_objects_do_not_travel() -> None:
    assert through({"n": np.int32(5), "x": [np.float64(0.5)]}) == {"n": 5, "x": [0.5]}
    with pytest.raises(FrameError, match="dtype object"):
        proto.encode(proto.Data(0, "w", [[0, [0], [np.array([object()])]]], []))


def ext_frame(code: int, data: bytes) -> bytes:
    body = {"tick": 0, "source": "w", "messages": [[0, [0], [msgpack.ExtType(code, data)]]],
            "acks": []}
    return msgpack.packb([proto.VERSION, "DATA", body], use_bin_type=True)


@pytest.mark.parametrize("code, data, words", [
    (9, b"", "unknown msgpack ext type 9"),
    (1, b"\xc1", "not [dtype, shape, bytes]"),
    (1, msgpack.packb(["|O", [1], b"12345678"]), "not one that can travel"),
    (1, msgpack.packb(["<f8", [2], b"1234"]), "with 4 bytes of contents"),
    (1, msgpack.packb(["<f8", [-1], b""]), "not [dtype, shape, bytes]"),
    (1, msgpack.packb(["nonsense", [1], b"1"]), "unknown dtype"),
    (1, msgpack.packb(["<f8", [1] * 40, b"12345678"]), "not [dtype, shape, bytes]"),
])
def test_hostile_array_data_is_a_frame_error(code: int, data: bytes, words: str) -> None:
    with pytest.raises(FrameError) as caught:
        proto.decode_data(ext_frame(code, data))
    assert caught.value.code == "bad-msgpack" and words in str(caught.value)


class Halo(Node):
    """Sends its tile (an array) to the next node; keeps what arrives."""

    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self) -> None:
        self.tile = np.full((3, 2), self.index, dtype="<f4")
        self.got: list[np.ndarray] = []

    def step(self) -> None:
        self.got += self.inbox["in"].drain()
        self.tile = self.tile * 1.5 + 1
        self.outbox["out"].put(self.tile)

    def state(self) -> Any:
        return self.tile  # an array in the digest: ext bytes, deterministic

    def result(self) -> Any:
        return {"tile": self.tile, "last": self.got[-1]}


def test_arrays_cross_processes_as_they_cross_nothing() -> None:
    b = Builder("halos", ticks=4)
    b.nodes("h", "tests.test_arrays:Halo", count=4).ring("h")
    results = [supervisor.run(b.build(), processes=p, app_dir=str(REPO),
                              handle_signals=False) for p in (1, 2, 4)]
    assert len({result.digest for result in results}) == 1
    for result in results:
        for i in range(4):
            got = result.nodes[f"h{i}"]
            left = results[0].nodes[f"h{(i - 1) % 4}"]["tile"]
            assert got["last"].dtype == np.float32 and got["last"].shape == (3, 2)
            # the last frame delivered is the neighbour's tile of the tick before
            assert np.array_equal((got["last"] * 1.5 + 1).astype("<f4"), left)


@pytest.mark.parametrize("array", [
    np.random.default_rng(1).random((128, 128)),
    np.arange(5000, dtype=">i4"),
    np.arange(40000, dtype="<f4").reshape(200, 200)[:, ::2],   # not contiguous
    np.ones((70, 70, 3), dtype=bool),
    np.arange(512, dtype="<c16"),
    np.zeros(100),                                               # small: packed
])
def test_a_big_array_is_digested_in_place_to_the_packed_digest(array: np.ndarray) -> None:
    import xxhash

    from hiocluster.node import digest_state, pack_state
    from hiocluster.protocol import arrays
    assert digest_state(array) == xxhash.xxh3_128_digest(pack_state(array))
    assert (arrays.digest(array) is None) == (array.nbytes < arrays.DIGEST_DIRECT_BYTES)
