"""The machine a benchmark ran on, for its JSON record, and writing that record (shared by the benchmark scripts)."""

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    """CPU model (from /proc/cpuinfo where there is one), logical CPUs, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(path: str | os.PathLike, record, indent: int = 2) -> Path:
    """Writes `record` as JSON to `path` (folders made), atomically: a run killed meanwhile leaves the previous
    results file whole, never half of the new one."""
    from mqirtn_app.atomic import write_bytes_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(record, indent=indent) + "\n").encode())
    return path


def clustered_embeddings(gallery_size: int, dim: int, clusters: int, query_count: int, seed: int):
    """A synthetic search workload: `gallery_size` L2-normalised vectors around `clusters` random centres (so
    approximate indexes have structure to exploit) and `query_count` queries, each a gallery row plus a little noise.
    The same arguments give the same tensors in every benchmark script."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator)
    assignment = torch.randint(0, clusters, (gallery_size,), generator=generator)
    gallery = centers[assignment] + 0.5 * torch.randn(gallery_size, dim, generator=generator)
    gallery = torch.nn.functional.normalize(gallery, dim=-1)
    picks = torch.randint(0, gallery_size, (query_count,), generator=generator)
    queries = gallery[picks] + 0.05 * torch.randn(query_count, dim, generator=generator)
    return gallery, torch.nn.functional.normalize(queries, dim=-1)
