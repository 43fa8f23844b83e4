"""tike_cuda.distributed in this process, in a gloo group of one: the README's snippet as
written, and the benchmark's worker (each provider runs; the bytes counted at the
collectives are what docs/distributed.md says)."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tike_cuda
from tike_cuda import bench_distributed
from tike_cuda.distributed import payload_bytes

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_readme_snippet(world_of_one):
    text = README.read_text()
    section = text[text.index("### With tensor parallelism"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    B, T, V = 3, 4, 50
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    env = dict(logits=logits, ref_logits=torch.randn(B, T, V, generator=g), tp_group=None,
               responses=torch.randint(0, V, (B, T), generator=g),
               old_logprobs=torch.randn(B, T, generator=g) - 3,
               response_mask=torch.rand(B, T, generator=g) > 0.3)
    exec(compile(code, str(README), "exec"), env)
    kw = dict(mask=env["response_mask"])
    torch.testing.assert_close(env["logp"], tike_cuda.token_logprobs(logits, env["responses"], **kw))
    torch.testing.assert_close(env["kl"], tike_cuda.topk_kl(
        logits, env["ref_logits"], 16, sampled_tokens=env["responses"],
        old_logprobs=env["old_logprobs"], **kw))


def test_bench_worker(tmp_path):
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
