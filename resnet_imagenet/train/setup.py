"""What training is built from: the solver's TRAIN and TEST nets, their shared blobs, feeds and learnables."""

from __future__ import annotations

import logging
import os

import torch

from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.data.shapes import data_input_shapes
from resnet_imagenet.net.cost import GB, check_footprint, machine_memory
from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.net.weights import load_weights
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TEST, TRAIN, parse_phase, read_net, read_solver, upgrade_net
from resnet_imagenet.solver.solver import Learnable, check_solver
from resnet_imagenet.train import preflight
from resnet_imagenet.train.dist import convert_sync_batchnorm

log = logging.getLogger(__name__)


def load_solver(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt and refuse, before any work, what training cannot run."""
    sp = read_solver(path)
    check_solver(sp)
    if sp.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
        # caffe: Restore picks the reader by file name, so a BINARYPROTO pair resumes under either format
        log.warning("%s: snapshot_format HDF5: snapshots are written as BINARYPROTO (HDF5 states are read)", path)
    if sp.max_iter <= 0:
        raise ValueError(f"{path}: max_iter must be > 0")
    return sp


def solver_nets(
    sp: caffe_pb2.SolverParameter, *, check_data: bool = True
) -> tuple[caffe_pb2.NetParameter, list[caffe_pb2.NetParameter]]:
    """caffe: Solver::InitTrainNet / InitTestNets -- the TRAIN net and one TEST net per test_iter.

    ``check_data``: refuse what their DBs show before anything is built (train/preflight.py: a missing LMDB,
    class lists that disagree, a classifier short of classes); ``train --check`` collects those itself."""
    given = [f for f in ("net", "net_param", "train_net", "train_net_param") if sp.HasField(f)]
    if len(given) != 1:
        raise ValueError(
            f"the solver must give exactly one of net, net_param, train_net, train_net_param (has {given})"
        )
    general = None
    if sp.HasField("net_param"):
        general = train = sp.net_param
    elif sp.HasField("net"):
        general = train = read_net(sp.net)
    elif sp.HasField("train_net_param"):
        train = sp.train_net_param
    else:
        train = read_net(sp.train_net)
    tests = list(sp.test_net_param) + [read_net(p) for p in sp.test_net]
    if not tests and general is not None:
        tests = [general] * len(sp.test_iter)
    if len(tests) != len(sp.test_iter):
        raise ValueError(f"the solver has {len(tests)} test net(s) but {len(sp.test_iter)} test_iter value(s)")
    if sp.test_state and len(sp.test_state) != len(tests):
        raise ValueError(f"the solver has {len(sp.test_state)} test_state for {len(tests)} test net(s)")
    ts = sp.train_state
    train = filter_net(train, TRAIN, ts.level, tuple(ts.stage))
    out = []
    for i, t in enumerate(tests):
        st = sp.test_state[i] if sp.test_state else caffe_pb2.NetState()
        out.append(filter_net(t, TEST, st.level, tuple(st.stage)))
    if check_data:
        preflight.refuse(sp, train, out)
    return train, out


def load_data_net(
    model: str | os.PathLike | caffe_pb2.NetParameter,
    weights: str | os.PathLike | None = None,
    phase: str | int = "test",
    base_dir: str | os.PathLike | None = None,
    level: int = 0,
    stages: tuple[str, ...] = (),
    *,
    allow_missing_weights: bool = False,
) -> CaffeNet:
    """net.load_net for a net whose Data / ImageData layers are read: their top shapes come from the first
    record (data/shapes.py, as Caffe's DataLayerSetUp), with paths from ``base_dir`` (default: the cwd).

    Refused first (train/preflight.py): a missing source, TEST and TRAIN class lists that disagree; and a layer
    with blobs that ``weights`` does not reach, unless ``allow_missing_weights`` (net/weights.py load_weights)."""
    ph = parse_phase(phase)
    net_param = read_net(model) if not isinstance(model, caffe_pb2.NetParameter) else model
    upgrade_net(net_param)
    name = model if not isinstance(model, caffe_pb2.NetParameter) else f"net '{net_param.name}'"
    preflight.refuse_model(name, net_param, base_dir, ph, level, stages)
    shapes = data_input_shapes(filter_net(net_param, ph, level, stages).layer, base_dir)
    net = load_net(net_param, None, ph, level, stages, input_shapes=shapes)
    if weights:
        load_weights(net, weights, missing="allow" if allow_missing_weights else "refuse")
    return net


def check_memory(nets: list[tuple[caffe_pb2.NetParameter, int]], gpu: int | None, max_gb: float | None) -> None:
    """Refuse, in one line and before anything is allocated, a net that needs more memory than the limit:
    ``max_gb`` (0: no check), by default the memory of GPU ``gpu`` (None: of this machine)."""
    if max_gb == 0:
        return
    limit = int(max_gb * GB) if max_gb is not None else machine_memory(gpu)
    where = "--max-memory" if max_gb is not None else (f"GPU {gpu}" if gpu is not None else "this machine's memory")
    for param, phase in nets:
        check_footprint(param, phase, limit, where, data_input_shapes(param.layer, None))


def build_nets(
    train_param: caffe_pb2.NetParameter,
    test_params: list[caffe_pb2.NetParameter],
    *,
    device: torch.device,
    channels_last: bool,
    weights: str | None = None,
    resume: str | os.PathLike | caffe_pb2.NetParameter | None = None,
    sync_bn: bool = False,
) -> tuple[CaffeNet, list[CaffeNet]]:
    """The TRAIN net and the TEST nets (pass no test_params where this process does not test), on ``device``.

    ``weights`` (comma-separated .caffemodels) fine-tunes both; ``resume`` is a snapshot's caffemodel.
    """
    # caffe: a data layer's top shape comes from its first record (data/shapes.py)
    net = CaffeNet(train_param, TRAIN, input_shapes=data_input_shapes(train_param.layer))
    if not net.loss_weights:
        raise ValueError("the TRAIN net has no loss (no *Loss layer or loss_weight)")
    test_nets = [CaffeNet(tp, TEST, input_shapes=data_input_shapes(tp.layer)) for tp in test_params]
    if weights:  # fine-tuning: layers the file lacks keep their fillers (a warning names them); none at all: refused
        load_weights(net, weights, missing="finetune")
    if isinstance(resume, caffe_pb2.NetParameter):  # Caffe's HDF5 weights, read already
        net.copy_from(resume)
    elif resume:
        net.load_caffemodel(resume)
    if sync_bn:
        convert_sync_batchnorm(net)
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    for t in test_nets:
        share_weights(t, net)
        if weights:  # caffe: -weights reaches the test nets' own layers too
            t.load_caffemodel(weights)
        t.to(device).eval()  # caffe: TEST phase -- BatchNorm uses the global statistics
    return net, test_nets


def share_weights(test_net: CaffeNet, train_net: CaffeNet) -> None:
    """caffe: Net::ShareTrainedLayersWith -- the TEST net's blobs become the TRAIN net's, by layer name."""
    source = dict(train_net.layers.items())
    for name, m in test_net.layers.items():
        src = source.get(name)
        if src is None:
            continue
        for attr in m.blob_names:
            mine, theirs = getattr(m, attr, None), getattr(src, attr, None)
            if mine is None or theirs is None:
                continue
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"layer '{name}' blob {attr}: TEST net shape {tuple(mine.shape)}, TRAIN {tuple(theirs.shape)}"
                )
            if attr in m._parameters:
                m._parameters[attr] = theirs
            else:
                m._buffers[attr] = theirs


class Feeds:
    """The DataFeeds of one net, one per data layer, each with the tops it fills; saves and restores its positions."""

    def __init__(self, feeds: list[tuple[DataFeed, list[str]]], self_fed: int = 0, positioned: tuple = ()):
        self.feeds = feeds
        self.self_fed = self_fed  # items per batch of layers that make their own tops (HDF5Data, DummyData)
        self.positioned = list(positioned)  # those of them with a read position (HDF5Data: position / seek)

    @property
    def batch_size(self) -> int:
        """Images per batch, over all the net's data layers."""
        return sum(f.batch_size for f, _ in self.feeds) + self.self_fed

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch of every feed, by top name (data, and label when the layer has a second top)."""
        out = {}
        for feed, tops in self.feeds:
            data, label = feed.next()
            out[tops[0]] = data
            if len(tops) > 1:
                out[tops[1]] = label
        return out

    def state_dict(self) -> list[dict]:
        """Each feed's position (DataFeed.state_dict), in layer order, then each HDF5Data layer's."""
        return [f.state_dict() for f, _ in self.feeds] + [m.position() for m in self.positioned]

    def load_state_dict(self, states: list[dict]) -> None:
        for (feed, _), s in zip(self.feeds, states):
            feed.load_state_dict(s)
        for m, s in zip(self.positioned, states[len(self.feeds) :]):  # a snapshot from before has none
            m.seek(s)

    def close(self) -> None:
        for feed, _ in self.feeds:
            feed.close()


def build_feeds(
    net: CaffeNet,
    phase: int,
    *,
    rank: int,
    world: int,
    seed: int,
    workers: int,
    device: torch.device,
    channels_last: bool,
    order: str = "shuffle",
) -> Feeds:
    """One DataFeed per Data / ImageData layer of ``net``; other data layers have nothing to train on.

    ``order``: a TRAIN Data layer's record order (data/feed.py: Caffe's ``keys``, or ``shuffle``)."""
    out = []
    for lp in net.data_layers:
        if lp.type not in ("Data", "ImageData"):
            raise ValueError(f"layer '{lp.name}': a {lp.type} layer has no data to train on; use a Data layer (LMDB)")
        feed = DataFeed(
            lp,
            phase,
            rank=rank,
            world_size=world,
            seed=seed,
            num_workers=workers,
            device=device,
            channels_last=channels_last,
            order=order,
        )
        out.append((feed, list(lp.top)))
        _label_checks(net, feed, list(lp.top))
    # HDF5Data / DummyData fill their own tops at each forward (net/layers/data.py): no DataFeed for them
    self_fed = [lp for lp in net.layer_params if getattr(net.layers[lp.name], "feeds_itself", False)]
    if not out and not self_fed:
        raise ValueError(
            f"the {'TRAIN' if phase == TRAIN else 'TEST'} net has no data layer (Data, ImageData, HDF5Data)"
        )
    positioned = [net.layers[lp.name] for lp in self_fed if hasattr(net.layers[lp.name], "position")]
    return Feeds(out, sum(net.blob_shapes[lp.top[0]][0] for lp in self_fed if lp.top), positioned)


def _label_checks(net: CaffeNet, feed: DataFeed, tops: list[str]) -> None:
    """The classes a feed's labels index: the class axis of the scores its label meets in a SoftmaxWithLoss
    or Accuracy layer (the classifier's num_output)."""
    for lp in net.layer_params:
        if lp.type in ("SoftmaxWithLoss", "Accuracy") and len(lp.bottom) > 1 and lp.bottom[1] in tops:
            param = lp.loss_param if lp.type == "SoftmaxWithLoss" else lp.accuracy_param
            ignore = param.ignore_label if param.HasField("ignore_label") else None
            classes = net.blob_shapes[lp.bottom[0]][1]
            feed.check_labels(classes, ignore, f"layer '{lp.name}' ({classes} classes in '{lp.bottom[0]}')")
            return


def learnables(net: CaffeNet) -> list[Learnable]:
    """The net's learnable blobs, each once; lr_mult 0 means no gradient (caffe: param_propagate_down false)."""
    seen: dict[int, Learnable] = {}
    for layer, i, p, lr_mult, decay_mult in net.learnable():
        if id(p) not in seen:
            seen[id(p)] = Learnable(p, lr_mult, decay_mult, f"{layer}[{i}]")
    for x in seen.values():
        x.param.requires_grad_(x.lr_mult != 0)
    return list(seen.values())
