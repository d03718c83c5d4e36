"""Export cases from replayed user reports (issue 14, kinds b, a and d), on small models of our own.

* (b) Brevitas writes ``DequantizeLinear -> Transpose -> MatMul`` for a bias-free ``nn.Linear`` in
  QCDQ: the read-back follows layout ops, and a graph whose parity passed is written even when the
  read-back fails (a warning naming our bug, never "report this model" as an error).
* (a) ``ConvTranspose`` has no qonnx cost: it is costed here, MACs checked against a product count.
* (d) exports give the model back in the train/eval mode it came in, BatchNorm statistics untouched.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

import aq_brevitas.export.graph as graph_module
import aq_brevitas.export.qonnx as qonnx_module
from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.export import export_qcdq, export_qonnx, finn_check, inference_cost, layer_table
from aq_brevitas.export.graph import map_layers
from aq_brevitas.nnutils import layer_geometry
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import apply_policy, quantize
from conftest import ConvBNDropNet

torch.set_num_threads(1)


class SignalNet(nn.Module):
    """A flat signal (N x 16): bias-free Linear, reshaped to N x 4 x 3, bias-free Conv1d, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Linear(16, 12, bias=False)
        self.mix = nn.Conv1d(4, 6, 3, padding=1, bias=False)
        self.head = nn.Linear(18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.expand(x)).view(x.shape[0], 4, 3)
        return self.head(torch.relu(self.mix(x)).flatten(1))


SIGNAL_POLICY = LayerwisePolicy(
    {
        "expand": LayerSpec(4, "max", "per_channel", act_bit_width=8),
        "mix": LayerSpec(3, "max", "per_tensor", act_bit_width=6),
        "head": LayerSpec(6, "max", "per_channel", act_bit_width=8),
    }
)


def _signal_model():
    torch.manual_seed(0)
    x = torch.rand(32, 16)
    return quantize(SignalNet().eval(), SIGNAL_POLICY, calibration_data=x).eval(), x


def _op_chain(path, first, *rest):
    """Whether the graph at ``path`` has a ``first`` node feeding ``rest[0]`` feeding ``rest[1]``..."""
    g = onnx.load(str(path)).graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    heads = [n for n in g.node if n.op_type == first]
    for op in rest:
        heads = [c for h in heads for c in consumers.get(h.output[0], []) if c.op_type == op]
    return bool(heads)


# ---- (b) read-back through layout ops ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcdq", "qonnx"])
def test_bias_free_linear_and_conv1d_read_back_their_bits(fmt, tmp_path):
    q, x = _signal_model()
    export = export_qcdq if fmt == "qcdq" else export_qonnx
    path = tmp_path / f"{fmt}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no read-back warning on a mappable graph
        res = export(q, path, x[:1], images=x[1:5])
    assert res.layer_table_available and res.readback_problem == ""
    assert res.layer_bits == {"expand": 4, "mix": 3, "head": 6}
    assert res.act_bits == {"expand": 8, "mix": 6, "head": 8}
    assert res.max_abs_diff <= res.allowed_diff
    if fmt == "qcdq":  # the shape that broke it: the weight's DequantizeLinear -> Transpose -> MatMul
        assert _op_chain(path, "DequantizeLinear", "Transpose", "MatMul")
    else:
        assert (
            all(r["graph"] == r["quantizers"] for r in res.weight_bits.values()) and len(res.weight_bits) == 3
        )
        assert inference_cost(path, q).weight_bits == res.weight_bits


def test_read_back_follows_reshape_squeeze_unsqueeze_identity(tmp_path):
    """Layout ops an exporter may put between a weight's quantizer and its layer, inserted by hand."""
    q, x = _signal_model()
    path = tmp_path / "m.onnx"
    export_qcdq(q, path, x[:1])
    g = onnx.load(str(path))
    tr = next(n for n in g.graph.node if n.op_type == "Transpose" and n.output[0].startswith("/expand"))
    src = tr.input[0]  # the dequantized 12 x 16 weight
    g.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "ax0"),
            numpy_helper.from_array(np.array([0, 4, -1], np.int64), "shape3"),  # 0: copy dim 0
            numpy_helper.from_array(np.array([12, 16], np.int64), "shape2"),
        ]
    )
    chain = [
        helper.make_node("Unsqueeze", [src, "ax0"], ["l1"]),  # 1 x 12 x 16
        helper.make_node("Squeeze", ["l1", "ax0"], ["l2"]),  # 12 x 16
        helper.make_node("Reshape", ["l2", "shape3"], ["l3"]),  # 12 x 4 x 4
        helper.make_node("Identity", ["l3"], ["l4"]),
        helper.make_node("Reshape", ["l4", "shape2"], ["l5"]),  # 12 x 16
    ]
    at = list(g.graph.node).index(tr)
    for i, node in enumerate(chain):
        g.graph.node.insert(at + i, node)
    tr.input[0] = "l5"
    onnx.checker.check_model(g)
    graph = map_layers(g, q, "qcdq")
    assert graph.problem == ""
    assert {n: gl.weight_bits for n, gl in graph.layers.items()} == {"expand": 4, "mix": 3, "head": 6}
    # the ops are applied, not skipped: a reshape to 16 x 12 (no transpose) scrambles the weight
    g.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([16, 12], np.int64), "shape2"))
    problem = map_layers(g, q, "qcdq").problem
    assert problem.startswith("graph node(s) /expand/MatMul have weights that match no layer")
    assert "layer(s) expand not found" in problem


def test_read_back_failure_after_parity_still_writes_the_file(tmp_path, monkeypatch):
    q, x = _signal_model()
    # the read-back as it was before it followed layout ops: QCDQ's bias-free Linear is not found
    monkeypatch.setattr(graph_module, "LAYOUT_OPS", ())
    path = tmp_path / "qcdq.onnx"
    with pytest.warns(RuntimeWarning, match=r"an aq-brevitas bug.*please report the model") as caught:
        res = export_qcdq(q, path, x[:1], images=x[1:3])
    msg = str(caught[0].message)
    assert "QCDQ export wrote" in msg and "(parity passed)" in msg and "layer(s) expand not found" in msg
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert path.is_file() and res.max_abs_diff <= res.allowed_diff and res.images_checked == 3
    assert not res.layer_table_available and "expand" in res.readback_problem
    assert res.layer_bits == {} and res.act_bits == {} and res.bipolar_layers == []
    assert layer_table(res).startswith("per-layer bit table unavailable: ")
    monkeypatch.undo()

    # QONNX: a weight that matches no layer (as if the exporter had changed it), then a failing cost
    real = graph_module._match_weight
    monkeypatch.setattr(graph_module, "_match_weight", lambda layer, fmt: real(layer, fmt) + (layer is q.mix))
    path = tmp_path / "qonnx.onnx"
    with pytest.warns(RuntimeWarning, match="aq-brevitas bug") as caught:
        res = export_qonnx(q, path, x[:1])
    assert path.is_file() and not res.layer_table_available
    assert (
        "have weights that match no layer" in res.readback_problem
        and "layer(s) mix not found" in res.readback_problem
    )
    assert res.weight_bits == {} and res.cost is not None  # costed, but weight memory not checked per layer
    monkeypatch.undo()

    def broken(*_a, **_k):
        raise AssertionError("Weight has undefined shape")

    monkeypatch.setattr(qonnx_module, "qonnx_cost", broken)
    with pytest.warns(RuntimeWarning, match=r"qonnx inference_cost failed \(AssertionError: Weight has"):
        res = export_qonnx(q, tmp_path / "c.onnx", x[:1])
    assert (tmp_path / "c.onnx").is_file() and res.cost is None and not res.layer_table_available


def test_user_facing_failures_stay_errors(tmp_path, monkeypatch):
    q, x = _signal_model()
    # a wrong model given to inference_cost is the user's mistake: an error, with the fix
    other, _ = _signal_model()
    with torch.no_grad():
        other.head.weight.mul_(2)
    export_qonnx(q, tmp_path / "ok.onnx", x[:1])
    with pytest.raises(ModelError, match="match no layer .* pass the model the file was exported from"):
        inference_cost(tmp_path / "ok.onnx", other)
    # the model re-bitted since the file was written: its quantizers predict other weight bits
    rebit = apply_policy(q, LayerwisePolicy({"mix": LayerSpec(8)}))
    with pytest.raises(
        ModelError, match="layer mix: the exported graph stores 216 weight bits, the model.s quantizers pre"
    ):
        inference_cost(tmp_path / "ok.onnx", rebit)


# ---- (k, export side) every use of a weight is found in the graph --------------------------------


class Reuse(nn.Module):
    """``a`` called twice; ``w`` used through F.linear (stays float); ``tied`` shares ``a``'s Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.a.weight
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(torch.relu(self.a(x))))
        return F.linear(torch.relu(self.tied(x)), self.w)


@pytest.mark.parametrize("fmt", ["qonnx", "qcdq"])
def test_reused_layer_shared_weight_and_float_parameter_are_all_read_back(fmt, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 8)
    policy = LayerwisePolicy({"a": LayerSpec(4, act_bit_width=8), "tied": LayerSpec(6, act_bit_width=8)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="these weights are used outside")  # nnutils says so
        warnings.filterwarnings("ignore", message="layers a .*, tied .* share one weight")  # convert does
        q = quantize(Reuse().eval(), policy, calibration_data=x).eval()
        export = export_qcdq if fmt == "qcdq" else export_qonnx
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no read-back failure
            res = export(q, tmp_path / "m.onnx", x[:1], images=x[1:3])
    assert res.layer_table_available
    assert res.layer_bits == {"a": 4, "tied": 6}  # the tied copy at its own bits, not a's
    assert res.layer_calls == {"a": 2}
    assert list(res.float_weights) == ["w"]
    table = layer_table(res)
    assert "a (x2 calls)" in table and "float weights outside the quantizable layers" in table
    if fmt == "qonnx":
        # one stored copy per layer, each at its layer's bits; a's second call costs MACs, not memory
        assert res.weight_bits == {
            "a": {"graph": 64 * 4, "quantizers": 64 * 4},
            "tied": {"graph": 64 * 6, "quantizers": 64 * 6},
        }
        rows = list(res.cost.layers.values())
        assert [r.layer for r in rows].count("a") == 2 and {"w (float)"} <= {r.layer for r in rows}
        assert sum(r.macs for r in rows if r.layer == "a") == 2 * 64


# ---- (a) ConvTranspose cost ------------------------------------------------------------------------


class UpNet(nn.Module):
    """8x8 image -> stride-2 conv (4 x 4 x 4) -> ConvTranspose2d back to 8 x 8 -> linear head."""

    def __init__(self, groups: int = 1, padding: int = 0) -> None:
        super().__init__()
        k = 2 + 2 * padding  # output 8 x 8 for both paddings
        self.enc = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, k, stride=2, padding=padding, groups=groups)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.up(torch.relu(self.enc(x)))).flatten(1))


def _products(layer: nn.ConvTranspose2d, in_shape: tuple[int, ...], padding: int = 0) -> int:
    """Products one forward of ``layer`` keeps in its output: with all-ones input and weights and no
    bias, each product adds exactly 1 to the output sum. With ``padding`` 0 none is cropped: all of them."""
    with torch.no_grad():
        ones = F.conv_transpose2d(
            torch.ones(1, *in_shape),
            torch.ones_like(layer.weight),
            stride=layer.stride,
            padding=padding,
            groups=layer.groups,
        )
    return int(ones.sum())


@pytest.mark.parametrize("groups", [1, 2])
def test_convtranspose_exports_to_qonnx_with_its_macs(groups, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    policy = LayerwisePolicy(default=LayerSpec(4, "max", "per_tensor", act_bit_width=8))
    q = quantize(UpNet(groups).eval(), policy, calibration_data=x).eval()
    path = tmp_path / "up.onnx"
    res = export_qonnx(q, path, x[:1], images=x[1:3])
    assert res.layer_bits == {"enc": 4, "up": 4, "fc": 4} and res.act_bits["up"] == 8
    row = next(r for r in res.cost.layers.values() if r.layer == "up")
    assert res.cost.costed_here == ["ConvTranspose_0"]
    c_in, c_out, k = 4, 6, 2 * 2
    analytic = c_in // groups * c_out * k * (4 * 4)  # in_channels/groups x out_channels x K x input pixels
    assert row.macs == analytic == _products(q.up, (4, 4, 4))
    assert row.macs == layer_geometry(q, x[:1])["up"].macs  # the policy's cost counts the same
    assert row.bops == analytic * 8 * 4  # 8-bit inputs x 4-bit weights
    assert row.mem_w_bits == 4 * q.up.weight.numel()
    assert res.weight_bits["up"] == {"graph": 4 * q.up.weight.numel(), "quantizers": 4 * q.up.weight.numel()}
    assert res.cost.total.macs == sum(r.macs for r in res.cost.layers.values())
    # FINN: no hardware layer in its default flow, said so with the way out
    checks = {c.name: c for c in finn_check(path, model=q)}
    assert not checks["supported_op_types"].passed
    assert checks["supported_op_types"].detail.startswith("unsupported: ConvTranspose (FINN's default build")
    assert "InferPixelPaddingDeconv" in checks["supported_op_types"].detail


def test_convtranspose_with_padding_counts_every_scattered_product(tmp_path):
    """With padding, products landing on cropped border positions are still computed (and counted)."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    q = quantize(UpNet(padding=1).eval(), LayerwisePolicy(default=LayerSpec(4)), calibration_data=x).eval()
    res = export_qonnx(q, tmp_path / "p.onnx", x[:1])
    row = next(r for r in res.cost.layers.values() if r.layer == "up")
    assert row.macs == 4 * 6 * 4 * 4 * (4 * 4) == layer_geometry(q, x[:1])["up"].macs
    assert row.macs == _products(q.up, (4, 4, 4))  # the scatter computes every product
    assert _products(q.up, (4, 4, 4), padding=1) < row.macs  # some land on cropped positions


def test_convtranspose_per_output_channel_exports_to_both_formats(tmp_path):
    """groups=1: one scale per output channel (weight axis 1) is one axis, which QCDQ can write."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    policy = LayerwisePolicy(default=LayerSpec(4, "max", "per_channel", act_bit_width=8))
    q = quantize(UpNet().eval(), policy, calibration_data=x).eval()
    assert tuple(q.up.quant_weight().scale.shape) == (1, 6, 1, 1)
    for export in (export_qcdq, export_qonnx):
        res = export(q, tmp_path / f"{export.__name__}.onnx", x[:1], images=x[1:3])
        assert res.layer_bits == {"enc": 4, "up": 4, "fc": 4} and res.max_abs_diff <= res.allowed_diff


def test_grouped_convtranspose_per_channel_qcdq_is_refused_in_one_line(tmp_path):
    """Per output channel of a grouped ConvTranspose2d the scale varies along weight axes 0 (the input
    channel, i.e. the group) and 1: QCDQ's DequantizeLinear cannot say that, QONNX's Quant can."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    policy = LayerwisePolicy(default=LayerSpec(4, "max", "per_channel", act_bit_width=8))
    q = quantize(UpNet(groups=2).eval(), policy, calibration_data=x).eval()
    with pytest.raises(
        ConfigError, match=r"QCDQ cannot express the weight scale of up .*varies along two axes"
    ):
        export_qcdq(q, tmp_path / "q.onnx", x[:1])
    assert not (tmp_path / "q.onnx").exists()
    res = export_qonnx(q, tmp_path / "m.onnx", x[:1], images=x[1:3])
    assert res.layer_bits["up"] == 4 and res.weight_bits["up"]["graph"] == 4 * q.up.weight.numel()


# ---- (d) train/eval mode -------------------------------------------------------------------------


def BNNet() -> nn.Module:  # noqa: N802 -- reads as the model class it builds
    return ConvBNDropNet(4, 8, 3, pool=True)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("export", [export_qonnx, export_qcdq], ids=["qonnx", "qcdq"])
def test_exports_keep_train_mode_and_batchnorm_statistics(export, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    m = BNNet().train()
    with torch.no_grad():
        m(x)  # non-trivial running statistics
    q = quantize(m, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x)
    q.train()
    q.drop.eval()  # a mixed state comes back as it was, module by module
    flags = {n: mod.training for n, mod in q.named_modules()}
    stats = _bn_state(q)
    assert stats  # the BatchNorm is still there (not folded)
    res = export(q, tmp_path / "m.onnx", x[:1], images=x[1:3])
    assert res.max_abs_diff <= res.allowed_diff  # checked in eval mode: running statistics, no dropout
    assert {n: mod.training for n, mod in q.named_modules()} == flags
    after = _bn_state(q)
    assert all(torch.equal(stats[k], after[k]) for k in stats)
