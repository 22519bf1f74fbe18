"""caffe.proto wire checks: field numbers, types and defaults that real Caffe files depend on.

The expected numbers are BVLC Caffe master's (src/caffe/proto/caffe.proto); the byte strings
are worked out by hand from the protobuf wire format (tag = number << 3 | wire type).
"""

from __future__ import annotations

import struct

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as FD

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text


def field(message, name: str) -> FD:
    return message.DESCRIPTOR.fields_by_name[name]


def spec(message, name: str) -> tuple[int, int, int]:
    """(number, type, label) as written in the .proto (labels via the descriptor proto: protobuf 7
    dropped FieldDescriptor.label)."""
    proto = descriptor_pb2.DescriptorProto()
    message.DESCRIPTOR.CopyToProto(proto)
    (f,) = [f for f in proto.field if f.name == name]
    return f.number, f.type, f.label


OPT, REP, REQ = (descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                 descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED)  # fmt: skip

# LayerParameter's *_param fields in BVLC master, with their numbers (plus caffe-pro's filter_param).
LAYER_PARAMS = {
    "transform_param": 100, "loss_param": 101, "accuracy_param": 102, "argmax_param": 103,
    "concat_param": 104, "contrastive_loss_param": 105, "convolution_param": 106, "data_param": 107,
    "dropout_param": 108, "dummy_data_param": 109, "eltwise_param": 110, "exp_param": 111,
    "hdf5_data_param": 112, "hdf5_output_param": 113, "hinge_loss_param": 114, "image_data_param": 115,
    "infogain_loss_param": 116, "inner_product_param": 117, "lrn_param": 118, "memory_data_param": 119,
    "mvn_param": 120, "pooling_param": 121, "power_param": 122, "relu_param": 123, "sigmoid_param": 124,
    "softmax_param": 125, "slice_param": 126, "tanh_param": 127, "threshold_param": 128,
    "window_data_param": 129, "python_param": 130, "prelu_param": 131, "spp_param": 132,
    "reshape_param": 133, "log_param": 134, "flatten_param": 135, "reduction_param": 136,
    "embed_param": 137, "tile_param": 138, "batch_norm_param": 139, "elu_param": 140, "bias_param": 141,
    "scale_param": 142, "input_param": 143, "crop_param": 144, "parameter_param": 145,
    "recurrent_param": 146, "swish_param": 147, "clip_param": 148, "filter_param": 149,
}  # fmt: skip


def test_solver_parameter_numbers_and_defaults() -> None:
    s = caffe_pb2.SolverParameter()
    assert spec(s, "type") == (40, FD.TYPE_STRING, OPT) and s.type == "SGD"
    assert spec(s, "delta") == (31, FD.TYPE_FLOAT, OPT) and s.delta == pytest.approx(1e-8)
    assert spec(s, "rms_decay") == (38, FD.TYPE_FLOAT, OPT) and s.rms_decay == pytest.approx(0.99)
    assert spec(s, "momentum2") == (39, FD.TYPE_FLOAT, OPT) and s.momentum2 == pytest.approx(0.999)
    assert spec(s, "snapshot_format") == (37, FD.TYPE_ENUM, OPT)
    assert s.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO == 1
    assert caffe_pb2.SolverParameter.HDF5 == 0
    assert spec(s, "solver_type") == (30, FD.TYPE_ENUM, OPT) and s.solver_type == caffe_pb2.SolverParameter.SGD
    assert caffe_pb2.SolverParameter.ADAM == 5
    assert spec(s, "solver_mode") == (17, FD.TYPE_ENUM, OPT) and s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert spec(s, "device_id") == (18, FD.TYPE_INT32, OPT)
    assert spec(s, "random_seed") == (20, FD.TYPE_INT64, OPT) and s.random_seed == -1
    assert spec(s, "layer_wise_reduce") == (41, FD.TYPE_BOOL, OPT) and s.layer_wise_reduce is True
    assert spec(s, "weights") == (42, FD.TYPE_STRING, REP)
    assert spec(s, "test_iter") == (3, FD.TYPE_INT32, REP)
    assert spec(s, "iter_size") == (36, FD.TYPE_INT32, OPT) and s.iter_size == 1
    # No fork-only fields (SSD's eval_type = 41 / ap_version = 42 would collide with BVLC's).
    assert "eval_type" not in s.DESCRIPTOR.fields_by_name
    assert max(f.number for f in s.DESCRIPTOR.fields) == 42


def test_solver_parameter_bytes() -> None:
    s = caffe_pb2.SolverParameter(type="Adam", delta=0.5, layer_wise_reduce=False, weights=["w"])
    # field 31 float (0xfd 0x01), 40 string (0xc2 0x02), 41 bool (0xc8 0x02), 42 string (0xd2 0x02)
    assert s.SerializeToString() == (
        b"\xfd\x01" + struct.pack("<f", 0.5) + b"\xc2\x02\x04Adam" + b"\xc8\x02\x00" + b"\xd2\x02\x01w"
    )


def test_solver_state_fields_and_bytes() -> None:
    st = caffe_pb2.SolverState()
    assert [(f.name, *spec(st, f.name)) for f in st.DESCRIPTOR.fields] == [
        ("iter", 1, FD.TYPE_INT32, OPT),
        ("learned_net", 2, FD.TYPE_STRING, OPT),
        ("history", 3, FD.TYPE_MESSAGE, REP),
        ("current_step", 4, FD.TYPE_INT32, OPT),
    ]
    st.iter, st.learned_net, st.current_step = 300, "a", 2
    st.history.add().data.append(1.0)
    # history: BlobProto with packed data (field 5, 1 float = 4 bytes) -> 0x2a 0x04 <f>
    blob = b"\x2a\x04" + struct.pack("<f", 1.0)
    assert st.SerializeToString() == b"\x08\xac\x02" + b"\x12\x01a" + b"\x1a\x06" + blob + b"\x20\x02"


def test_datum_field_types_and_bytes() -> None:
    d = caffe_pb2.Datum(channels=3, height=2, width=1, data=b"\x01\x02", label=7, encoded=True)
    assert d.SerializeToString() == b"\x08\x03\x10\x02\x18\x01\x22\x02\x01\x02\x28\x07\x38\x01"
    for name in ("channels", "height", "width", "label"):
        assert field(d, name).type == FD.TYPE_INT32, name
    # int32, not int64: out of range values are refused (an int64 field would accept them).
    with pytest.raises(ValueError):
        caffe_pb2.Datum(label=2**31)
    assert spec(d, "float_data") == (6, FD.TYPE_FLOAT, REP) and not field(d, "float_data").GetOptions().packed
    d2 = caffe_pb2.Datum(float_data=[1.0, 2.0])  # unpacked: one tag per value
    assert d2.SerializeToString() == b"\x35" + struct.pack("<f", 1.0) + b"\x35" + struct.pack("<f", 2.0)


def test_blob_proto_legacy_dims_are_int32() -> None:
    b = caffe_pb2.BlobProto()
    assert [spec(b, n) for n in ("num", "channels", "height", "width")] == [
        (i, FD.TYPE_INT32, OPT) for i in (1, 2, 3, 4)
    ]
    assert spec(b, "shape") == (7, FD.TYPE_MESSAGE, OPT)
    assert field(caffe_pb2.BlobShape(), "dim").type == FD.TYPE_INT64


def test_layer_parameter_has_every_bvlc_param() -> None:
    lp = caffe_pb2.LayerParameter()
    got = {f.name: f.number for f in lp.DESCRIPTOR.fields if f.name.endswith("_param")}
    assert got == LAYER_PARAMS
    assert sorted(LAYER_PARAMS.values()) == list(range(100, 150))
    assert [spec(lp, n)[0] for n in ("phase", "loss_weight", "param", "blobs", "propagate_down")] == [10, 5, 6, 7, 11]
    assert spec(lp, "include") == (8, FD.TYPE_MESSAGE, REP) and spec(lp, "exclude") == (9, FD.TYPE_MESSAGE, REP)


def test_required_and_new_layer_messages() -> None:
    assert spec(caffe_pb2.ClipParameter(), "min") == (1, FD.TYPE_FLOAT, REQ)
    assert spec(caffe_pb2.ClipParameter(), "max") == (2, FD.TYPE_FLOAT, REQ)
    assert caffe_pb2.SwishParameter().beta == 1.0
    assert caffe_pb2.InfogainLossParameter().axis == 1
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.MVNParameter().eps == pytest.approx(1e-9)
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL
    assert caffe_pb2.DataParameter().prefetch == 4
    assert spec(caffe_pb2.ConvolutionParameter(), "force_nd_im2col") == (17, FD.TYPE_BOOL, OPT)


def test_caffe_pro_additions_kept() -> None:
    ip = caffe_pb2.ImageDataParameter(new_dim=256, bicubic=True)
    assert spec(ip, "new_dim") == (13, FD.TYPE_UINT32, OPT) and spec(ip, "bicubic") == (14, FD.TYPE_BOOL, OPT)
    assert ip.SerializeToString() == b"\x68\x80\x02\x70\x01"
    lp = caffe_pb2.LayerParameter()
    lp.filter_param.num_output = 5
    assert lp.SerializeToString() == b"\xaa\x09\x02\x08\x05"  # field 149, length 2


def test_v1_convolution_round_trip() -> None:
    net = caffe_pb2.NetParameter(name="old")
    v1 = net.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION, bottom=["data"], top=["c"])
    v1.blobs_lr.extend([1.0, 2.0])
    v1.weight_decay.extend([1.0, 0.0])
    v1.convolution_param.num_output = 8
    v1.convolution_param.kernel_size.append(3)
    v1.blobs.add().shape.dim.extend([8, 3, 3, 3])
    wire = net.SerializeToString()
    back = caffe_pb2.NetParameter.FromString(wire)
    assert back == net and back.layers[0].type == 4 and list(back.layers[0].blobs_lr) == [1.0, 2.0]
    # NetParameter.layers is field 2; inside, type is field 5 and convolution_param field 10.
    one = caffe_pb2.NetParameter()
    one.layers.add(type=caffe_pb2.V1LayerParameter.CONVOLUTION).convolution_param.num_output = 8
    assert one.SerializeToString() == b"\x12\x06\x28\x04\x52\x02\x08\x08"
    text = 'layers { name: "c" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }'
    parsed = parse_text(text, caffe_pb2.NetParameter())
    assert parsed.layers[0].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert list(parsed.layers[0].weight_decay) == [1.0, 0.0]


def test_v0_and_v1_legacy_numbers() -> None:
    v1 = caffe_pb2.V1LayerParameter()
    names = ("layer", "bottom", "top", "name", "type", "blobs", "blobs_lr", "weight_decay")
    assert [spec(v1, n)[0] for n in names] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert spec(v1, "param")[0] == 1001 and spec(v1, "blob_share_mode")[0] == 1002
    assert caffe_pb2.V1LayerParameter.ABSVAL == 35 and caffe_pb2.V1LayerParameter.DECONVOLUTION == 39
    v0 = caffe_pb2.V0LayerParameter()
    assert spec(v0, "blobs")[0] == 50 and spec(v0, "hdf5_output_param")[0] == 1001
    assert v0.det_crop_mode == "warp" and v0.biasterm is True


def test_strict_reader_still_rejects_unknown_fields() -> None:
    with pytest.raises(PrototxtError, match="no_such_solver_field"):
        parse_text("no_such_solver_field: 1", caffe_pb2.SolverParameter())
