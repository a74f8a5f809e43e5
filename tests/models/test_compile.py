"""torch.compile of the teacher: one graph per process whatever the batch sizes a build's views end with.

The compiler here is a backend that records each graph dynamo hands it and runs it as traced (torch.compile's
extension point): what is counted is dynamo's real tracing and guarding, without inductor's minutes of C++
compilation on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skd.models.runtime import place
from skd.models.teachers import CompiledTeacher, forward


def recording():
    graphs = []

    def backend(graph, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4])
        return graph.forward

    return graphs, backend


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])  # channels_last: as on CUDA
def test_a_short_last_batch_is_padded_instead_of_compiled_again(layout):
    torch._dynamo.reset()
    model, device = teacher(), torch.device("cpu")
    # two views, each ending short
    batches = [torch.randn(n, 3, 16, 16).contiguous(memory_format=layout) for n in (8, 8, 3, 8, 5)]
    graphs, backend = recording()
    compiled = CompiledTeacher(place(model, device), batch_size=8, backend=backend)
    outputs = [forward(compiled, x, device, "none") for x in batches]
    assert len(graphs) == 1, f"compiled {len(graphs)} times for batches of 8, 8, 3, 8, 5: {graphs}"
    assert graphs[0][0][0] == 8, f"the one graph is for {graphs[0]}, not batches of 8"
    for x, out in zip(batches, outputs):
        eager = forward(model, x, device, "none")
        assert out.shape == eager.shape, f"{len(x)} images gave {tuple(out.shape)} logits"
        worst = (out - eager).abs().max().item()
        assert worst < 1e-5, f"a batch of {len(x)} padded to 8 moved its logits by {worst}"


def test_without_padding_the_short_batch_costs_a_second_graph():
    """What CompiledTeacher avoids: plain torch.compile traces again for the short batch."""
    torch._dynamo.reset()
    graphs, backend = recording()
    plain = torch.compile(teacher(), backend=backend)
    with torch.inference_mode():
        for n in (8, 8, 3, 5):
            plain(torch.randn(n, 3, 16, 16))
    assert len(graphs) == 2, f"plain torch.compile: {len(graphs)} graphs for batches 8, 8, 3, 5: {graphs}"
