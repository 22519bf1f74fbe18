"""CaffeNet: a prototxt net run in torch over named blobs, in prototxt order; load_net builds one."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.graph import BlobGraph, Value, blob_graph
from resnet_imagenet.net.layers.data import data_layer_shapes
from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.net.share import ParamSharing, present_blobs
from resnet_imagenet.net.weights import copy_trained_layers, layer_blobs, read_caffemodels
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, PrototxtError, parse_phase, read_net, upgrade_net
from resnet_imagenet.util.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


class CaffeNet(nn.Module):
    """Runs a (phase-filtered) NetParameter; see resnet_imagenet.load_net for the usual entry point."""

    def __init__(
        self,
        net_param: caffe_pb2.NetParameter,
        phase: int = caffe_pb2.TEST,
        input_shapes: dict[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.name = net_param.name
        self.phase = phase
        self.layer_params: list[caffe_pb2.LayerParameter] = []
        self.data_layers: list[caffe_pb2.LayerParameter] = []
        self.input_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.layers = nn.ModuleDict()
        self.loss_weights: dict[str, float] = {}
        self.blob_shapes: dict[str, tuple[int, ...]] = {}
        available: list[str] = []  # blobs written and not yet read
        self._renamed: set[str] = set()  # layers renamed NAME#k for a repeated name
        self.sharing = ParamSharing()  # blobs shared by param name (net/share.py)
        for lp in net_param.layer:
            lp = self._unique_name(lp)
            for b in lp.bottom:
                if b not in self.blob_shapes:
                    raise PrototxtError(f"layer '{lp.name}': unknown bottom blob '{b}'")
            if lp.type in DATA_LAYER_TYPES:
                top_shapes = self._add_data_layer(lp, input_shapes or {})
            else:
                top_shapes = self._add_layer(lp)
            available = [b for b in available if b not in lp.bottom]
            for t in lp.top:
                if t not in available:
                    available.append(t)
            self.blob_shapes.update(zip(lp.top, top_shapes))
        # caffe: Net::Init -- blobs left unconsumed after the last layer are the net's outputs, listed in name order
        # (available_blobs is a std::set<string>): what solver display and `caffe test` print by
        self.output_names = sorted(available)
        self._source_order = [lp.name for lp in net_param.layer]
        self._lp_index = {lp.name: lp for lp in self.layer_params}
        self._plan_fusion()
        self.train(phase == caffe_pb2.TRAIN)
        self._legacy: set[tuple[str, int]] = set()

    def _unique_name(self, lp: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """``lp``, or a copy named ``NAME#k`` when NAME is taken: Caffe accepts repeated layer names (BVLC's
        mnist_autoencoder has two layers "loss"), but a repeated name on a layer with blobs would make the
        by-name weight matching ambiguous, so that is refused (_add_layer)."""
        taken = set(self.layers) | {d.name for d in self.data_layers}
        if lp.name not in taken:
            return lp
        k = 1
        while f"{lp.name}#{k}" in taken:
            k += 1
        dup = caffe_pb2.LayerParameter()
        dup.CopyFrom(lp)
        dup.name = f"{lp.name}#{k}"
        self._renamed.add(dup.name)
        log.warning("layer '%s': the name is used before; this one is called '%s' here", lp.name, dup.name)
        return dup

    def _add_data_layer(self, lp: caffe_pb2.LayerParameter, given: dict[str, Sequence[int]]) -> list[tuple[int, ...]]:
        """Record a data layer: its tops are the net's inputs, shaped as ``given`` or as the layer says."""
        tops = list(lp.top)
        shapes = [tuple(given[t]) for t in tops] if all(t in given for t in tops) else data_layer_shapes(lp)
        shapes = [tuple(s) for s in shapes]
        self.data_layers.append(lp)
        self.input_names.extend(tops)
        self.input_shapes.update(zip(tops, shapes))
        return shapes

    def _add_layer(self, lp: caffe_pb2.LayerParameter) -> list[tuple[int, ...]]:
        """Build a (non-data) layer on the shapes of its bottoms; returns its top shapes."""
        module = L.build_layer(lp, [self.blob_shapes[b] for b in lp.bottom])
        if lp.name in self._renamed and any(True for _ in module.parameters()):
            raise PrototxtError(f"layer '{lp.name.split('#')[0]}': duplicate name on a layer with learnable blobs")
        self.sharing.add(lp, module)
        top_shapes = [tuple(s) for s in module.top_shapes()]
        if len(top_shapes) != len(lp.top):
            raise PrototxtError(f"layer '{lp.name}' ({lp.type}): needs {len(top_shapes)} tops")
        self.layers[lp.name] = module
        self.layer_params.append(lp)
        self._record_loss(lp)
        return top_shapes

    def _record_loss(self, lp: caffe_pb2.LayerParameter) -> None:
        # caffe: layer.hpp SetLossWeights -- *Loss layers weigh their first top 1 by default (other tops 0);
        # given weights number one per top
        if lp.loss_weight and len(lp.loss_weight) != len(lp.top):
            raise PrototxtError(
                f"layer '{lp.name}': loss_weight must be unspecified or given once per top blob "
                f"({len(lp.loss_weight)} for {len(lp.top)} tops)"
            )
        weights = list(lp.loss_weight) or ([1.0] if lp.type.endswith("Loss") else [])
        for top, w in zip(lp.top, weights):
            if w:
                self.loss_weights[top] = float(w)

    # Layers whose backward does not need their own output, so a following in-place ReLU is safe.
    _INPLACE_OK_AFTER = frozenset({"Convolution", "BatchNorm", "Scale", "Eltwise", "InnerProduct", "Pooling", "Concat"})

    def _plan_fusion(self) -> None:
        """Plan the two speed-ups forward() takes, from the net's blob graph (net/graph.py)."""
        g = blob_graph(self.layer_params)
        self._plan_bn_scale(g)
        self._plan_inplace(g)

    def _plan_bn_scale(self, g: BlobGraph) -> None:
        """BatchNorm directly followed by a one-bottom per-channel Scale on its top runs as one batch_norm call
        (the affine folded in, as torch's BatchNorm2d does), where the Scale is in place or is the only layer
        reading the BatchNorm's top blob (under any version)."""
        self._fused_scale: dict[str, str] = {}  # BatchNorm layer name -> Scale layer name
        self._bn_top: dict[str, str] = {}  # BatchNorm layer name -> its top blob
        for k, (lp, nxt) in enumerate(zip(self.layer_params, self.layer_params[1:])):
            if lp.type != "BatchNorm" or nxt.type != "Scale" or g.reads[k + 1] != g.writes[k][:1]:
                continue
            top = lp.top[0]
            sc = self.layers[nxt.name]
            per_channel = sc.axis == 1 and tuple(sc.weight.shape) == (self.blob_shapes[top][1],)
            readers_of_top = [i for (blob, _), readers in g.readers.items() if blob == top for i in readers]
            if per_channel and (nxt.top[0] == top or readers_of_top == [k + 1]):
                self._fused_scale[lp.name] = nxt.name
                self._bn_top[lp.name] = top
        self._fused_tops = {self._lp_index[s].top[0] for s in self._fused_scale.values()}

    def _plan_inplace(self, g: BlobGraph) -> None:
        """In-place ReLUs, and Eltwise SUMs adding into one of their bottoms (torchvision's ``out += identity``,
        a large allocation saved per residual block), where they overwrite a value that only they read and
        whose producer does not keep it for backward."""

        def overwritable(value: Value, k: int) -> bool:
            producer = g.producer.get(value)  # None: a net input
            ok_after = producer is not None and self.layer_params[producer].type in self._INPLACE_OK_AFTER
            return g.readers[value] == [k] and ok_after

        self._inplace_sum: dict[str, int] = {}  # Eltwise layer name -> index of the bottom it adds into
        for k, lp in enumerate(self.layer_params):
            module = self.layers[lp.name]
            if lp.type == "ReLU" and list(lp.top) == list(lp.bottom):
                # nothing read the value before; later readers read the ReLU's own (rectified) version
                module.inplace = overwritable(g.reads[k][0], k)
            elif (
                lp.type == "Eltwise"
                and module.op == caffe_pb2.EltwiseParameter.SUM
                and len(set(lp.bottom)) == len(lp.bottom)
            ):
                for i, value in enumerate(g.reads[k]):
                    if module.coeff[i] == 1.0 and overwritable(value, k):
                        self._inplace_sum[lp.name] = module.inplace_index = i
                        break

    def forward(self, *args: torch.Tensor, blobs: Sequence[str] | None = None, **inputs: torch.Tensor):
        """Run the net. Positional tensors fill ``input_names`` in order; keywords name inputs.

        Returns the output blobs (those no layer consumes), or the blobs named in ``blobs``.
        """
        if len(args) > len(self.input_names):
            raise TypeError(f"net has {len(self.input_names)} inputs {self.input_names}, got {len(args)} tensors")
        values: dict[str, torch.Tensor] = dict(zip(self.input_names, args))
        for k, v in inputs.items():
            if k not in self.input_names:
                raise TypeError(f"unknown input '{k}' (inputs: {self.input_names})")
            values[k] = v
        want = set(blobs or ())
        unknown = want - set(self.blob_shapes)
        if unknown:
            raise KeyError(f"unknown blob(s) {sorted(unknown)}")
        # A request for a BatchNorm's own output (not in-place under its Scale) runs that pair unfused.
        unfuse = {bn for bn, top in self._bn_top.items() if top in want and top not in self._fused_tops}
        skip = {sc for bn, sc in self._fused_scale.items() if bn not in unfuse}
        for lp in self.layer_params:
            if lp.name in skip:
                continue
            module = self.layers[lp.name]
            try:
                bottoms = [values[b] for b in lp.bottom]
            except KeyError as e:
                raise RuntimeError(
                    f"layer '{lp.name}': input blob {e} was not given (inputs: {self.input_names})"
                ) from None
            scale_name = self._fused_scale.get(lp.name)
            if scale_name is not None and lp.name not in unfuse:
                sc = self.layers[scale_name]
                out = module(bottoms[0], sc.weight, sc.bias)
                values[self._lp_index[scale_name].top[0]] = out
                continue
            i = self._inplace_sum.get(lp.name)
            if i is not None:  # through __call__, so hooks (time, pruning's sampling) still see it
                out = module(*bottoms, inplace=lp.bottom[i] not in want)
            else:
                out = module(*bottoms)
            tops = out if isinstance(out, tuple) else (out,)
            for name, t in zip(lp.top, tops):
                values[name] = t
        if blobs is not None:
            return {b: values[b] for b in blobs}
        return {b: values[b] for b in self.output_names if b in values}

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """caffe: the net's loss -- the sum of loss_weight * output over the loss blobs (in float32)."""
        return sum(w * out[name].float().sum() for name, w in self.loss_weights.items())

    def layer_params_by_name(self, name: str) -> caffe_pb2.LayerParameter:
        """The LayerParameter of the (non-data) layer ``name``."""
        return self._lp_index[name]

    def learnable(self) -> list[tuple[str, int, nn.Parameter, float, float]]:
        """(layer, blob index, parameter, lr_mult, decay_mult) for every learnable blob; a blob shared by param
        name appears under each of its layers, the same tensor with the multipliers merged (net/share.py)."""
        out = []
        for lp in self.layer_params:
            module = self.layers[lp.name]
            for i, attr in enumerate(present_blobs(module)):  # caffe: blobs_ holds only the blobs the layer has
                p = getattr(module, attr)
                if isinstance(p, nn.Parameter):
                    spec = lp.param[i] if i < len(lp.param) else caffe_pb2.ParamSpec()
                    out.append((lp.name, i, p, *self.sharing.multipliers(lp.name, i, spec)))
        return out

    # --- caffemodel I/O (net/weights.py) ------------------------------------------------------

    def to_proto(self, with_blobs: bool = True) -> caffe_pb2.NetParameter:
        """The net as a NetParameter (what Caffe's Net::ToProto writes), blobs included."""
        net = caffe_pb2.NetParameter(name=self.name)
        net.state.phase = self.phase
        params = {lp.name: lp for lp in self.data_layers + self.layer_params}
        for name in self._source_order:
            out = net.layer.add()
            out.CopyFrom(params[name])
            out.ClearField("blobs")
            if with_blobs and name in self.layers:
                out.blobs.extend(layer_blobs(name, self.layers[name], self._legacy))
        return net

    def save_caffemodel(self, path: str | os.PathLike) -> None:
        """Write Caffe's binary NetParameter with blobs (through a temporary file)."""
        atomic_write_bytes(path, self.to_proto(with_blobs=True).SerializeToString())

    def load_caffemodel(self, path: str | os.PathLike) -> None:
        """Copy weights by layer name from a .caffemodel (or several, comma-separated)."""
        for p, src in read_caffemodels(path):
            try:
                self.copy_from(src)
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from None

    def copy_from(self, src: caffe_pb2.NetParameter) -> None:
        """caffe: Net::CopyTrainedLayersFrom -- layers matched by name; unknown source layers ignored."""
        copy_trained_layers(self.layers, src, self._legacy)


def load_net(
    model: str | os.PathLike | caffe_pb2.NetParameter,
    weights: str | os.PathLike | None = None,
    phase: str | int = "test",
    level: int = 0,
    stages: Sequence[str] = (),
    input_shapes: dict[str, Sequence[int]] | None = None,
) -> CaffeNet:
    """Build a CaffeNet from a prototxt (path or NetParameter) for ``phase``, optionally loading weights."""
    ph = parse_phase(phase)
    if isinstance(model, caffe_pb2.NetParameter):
        net_param = caffe_pb2.NetParameter()
        net_param.CopyFrom(model)
        upgrade_net(net_param)  # a V1 NetParameter built in code is upgraded as a read file is
    else:
        net_param = read_net(model)
    filtered = filter_net(net_param, ph, level, tuple(stages))
    try:
        net = CaffeNet(filtered, ph, input_shapes=input_shapes)
    except PrototxtError as e:
        raise PrototxtError(
            f"{model if not isinstance(model, caffe_pb2.NetParameter) else net_param.name}: {e}"
        ) from None
    if weights:
        net.load_caffemodel(weights)
    return net
