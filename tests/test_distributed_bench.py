"""The vocabulary-parallel benchmark's worker, in this process (a gloo group of one): each
provider runs, the bytes are counted at the collectives, and they are what
docs/distributed.md says."""
import json

import torch

from tike_cuda import bench_distributed
from tike_cuda.distributed import payload_bytes


def test_bench_worker_world_1(tmp_path):
    args = bench_distributed.parse_args(["--world", "1", "--N", "8", "--V", "300", "--k", "4",
                                         "--repeats", "1", "--warmup", "0"])
    out = tmp_path / "rows.json"
    bench_distributed._worker(0, 1, str(tmp_path / "init"), str(out), args)
    rows = {(r["mode"], r["provider"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(m, p) for m in ("fwd", "fwdbwd") for p in bench_distributed.PROVIDERS}
    for mode in ("fwd", "fwdbwd"):  # the backward adds no communication
        ours = rows[mode, "vocab_parallel"]
        assert ours["collectives"] == 1
        assert ours["sent_B_per_token"] == payload_bytes(4, torch.bfloat16) == 4 * 8 + 24
        assert ours["gathered_B_per_token"] == ours["sent_B_per_token"]  # world 1
        gathered = rows[mode, "gather_logits"]
        assert gathered["collectives"] == 2 and gathered["sent_B_per_token"] == 2 * 300 * 2
        assert rows[mode, "local_only"]["collectives"] == 0
    print(bench_distributed.table(list(rows.values()), args))
