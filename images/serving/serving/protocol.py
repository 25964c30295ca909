"""The Open Inference Protocol (V2) REST data plane as both runtimes speak it.

Infer requests decode strictly into one [N, features] array, from JSON or from the binary tensor data
extension (the JSON header first, `Inference-Header-Content-Length` bytes long, then each input's raw
little-endian bytes; tritonclient's default). A request sends one [N, features] tensor, or, for a model
whose manifest names its features (serving/schema.py), one [N] or [N, 1] input per feature in any order:
the V2 columnar form, as MLServer's pandas codec and most clients send a table. Infer responses encode as
JSON or, for outputs the request asks so, as binary. The same code checks requests for the `oip` server and in front of MLServer, so a
request one runtime refuses is refused by the other with the same 400.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping

import numpy as np
import orjson

from serving.schema import ModelSchema

JSON_LENGTH_HEADER = b"inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"
# The gateway's client_max_body_size (images/gateway/nginx.conf.template explains the size); checked here
# too so a replica reached directly holds no larger body either.
MAX_BODY_BYTES = 1024 * 1024
INPUT_DATATYPES = ("FP32", "FP64")
# The binary extension's element types, little-endian; BYTES elements are length-prefixed instead.
FIXED_SIZE_DATATYPES = {
    "BOOL": np.dtype("?"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# What one column of a feature may be sent as (MLServer's pandas codec sends a column's own dtype), and what the
# metadata announces for it.
NUMERIC_DATATYPES = tuple(datatype for datatype in FIXED_SIZE_DATATYPES if datatype != "BOOL")
COLUMN_DATATYPES = {"float": NUMERIC_DATATYPES, "int": (*NUMERIC_DATATYPES, "BOOL")}
FEATURE_DATATYPES = {"float": "FP64", "int": "INT64"}
OUTPUT_DATATYPES = {"b": "BOOL", "i": "INT64", "u": "UINT64", "f": "FP64", "U": "BYTES", "S": "BYTES", "O": "BYTES"}
JSON_CONTENT = (b"content-type", b"application/json")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BadRequest(Exception):
    """A request the client must fix; answered with `status` and a V2 error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    id: Any
    input_name: str
    features: np.ndarray
    """[N, features], N >= 1, every value finite."""
    binary_by_output: Mapping[str, bool] = field(default_factory=dict)
    """Outputs the request names, and whether each goes back binary; empty: every output, as `binary_default`."""
    binary_default: bool = False
    json_tensor: bool = False
    """Whether the request is one [N, features] tensor with JSON data, which MLServer reads as it is sent."""

    def wants_binary(self, output: str) -> bool:
        return self.binary_by_output.get(output, self.binary_default)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key.lower() == name), None)


def json_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The binary extension's JSON header length, or None for an all-JSON body."""
    value = header_value(headers, JSON_LENGTH_HEADER)
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a byte count, got {value.decode('latin-1')!r}")
    return int(value)


def decode_infer_request(body: bytes, header_length: int | None, schema: ModelSchema) -> InferRequest:
    """The inputs of a V2 infer request as one [N, n_features] array in the schema's feature order, or
    BadRequest saying what is wrong: one [N, features] tensor, or (when the schema names the features) one
    [N] or [N, 1] input per feature, in any order."""
    if header_length is not None and header_length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
    header = body if header_length is None else body[:header_length]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs, tail = request["inputs"], BinaryTail(body, header_length)
    columnar = bool(schema.features and inputs and (len(inputs) > 1 or _name(inputs[0]) in schema.names))
    try:
        if columnar:
            input_name, features = "input-0", _columns(inputs, schema, tail, header)
        else:
            input_name, features = _tensor(inputs, schema.n_features, tail, header)
    except WrongInputs as error:
        raise BadRequest(f"{error}; {schema.expected_inputs()}") from None
    tail.check_consumed()
    binary_by_output, binary_default = _requested_outputs(request)
    return InferRequest(id=request.get("id"), input_name=input_name, features=features, binary_by_output=binary_by_output,
                        binary_default=binary_default, json_tensor=not columnar and not tail.taken)


class WrongInputs(Exception):
    """Inputs of another name, number, shape or datatype than the model takes; answered with the forms it takes."""


def _name(tensor: Any) -> Any:
    return tensor.get("name") if isinstance(tensor, dict) else None


def _described(tensor: Any) -> tuple[str, Any, Any]:
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= tensor.keys():
        raise WrongInputs("the input tensor needs 'name', 'shape', 'datatype' and 'data' (or binary data)")
    if not isinstance(tensor["name"], str):
        raise WrongInputs(f"input names are strings, got {tensor['name']!r}")
    return tensor["name"], tensor["shape"], tensor["datatype"]


def _counts(shape: Any, ranks: tuple[int, ...]) -> bool:
    return (isinstance(shape, list) and len(shape) in ranks
            and all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape))


def _tensor(inputs: list, n_features: int, tail: BinaryTail, header: bytes) -> tuple[str, np.ndarray]:
    """The one [N, n_features] input tensor."""
    if len(inputs) != 1:
        raise WrongInputs(f"expected exactly one input tensor, got {len(inputs)}")
    name, shape, datatype = _described(inputs[0])
    if datatype not in INPUT_DATATYPES:
        raise WrongInputs(f"input '{name}' has datatype {datatype!r}; this model takes FP32 or FP64")
    if not _counts(shape, (2,)):
        raise WrongInputs(f"input '{name}' must have shape [N, features], got {shape!r}")
    if shape[0] == 0:
        raise BadRequest(f"input '{name}' has shape {shape}: a batch needs at least one row")
    if shape[1] != n_features:
        raise WrongInputs(f"input '{name}' has {shape[1]} features; the model takes {n_features}")
    values = _values(inputs[0], name, shape, datatype, tail, header)
    return name, values.reshape(shape)


def _columns(inputs: list, schema: ModelSchema, tail: BinaryTail, header: bytes) -> np.ndarray:
    """One [N] or [N, 1] input per feature, stacked as FP64 columns in the schema's order."""
    described = [_described(tensor) for tensor in inputs]
    names = [name for name, _, _ in described]
    unknown = [name for name in dict.fromkeys(names) if name not in schema.names]
    repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    missing = [name for name in schema.names if name not in names]
    problems = ([f"no feature is named {_quoted(unknown)}"] if unknown else []) + (
        [f"{_quoted(repeated)} given more than once"] if repeated else []) + (
        [f"missing {_quoted(missing)}"] if missing else [])
    if problems:
        raise WrongInputs("; ".join(problems))
    types = {feature.name: feature.type for feature in schema.features}
    columns: dict[str, np.ndarray] = {}
    for tensor, (name, shape, datatype) in zip(inputs, described):
        if datatype not in COLUMN_DATATYPES[types[name]]:
            raise WrongInputs(f"input '{name}' has datatype {datatype!r}; a feature of type {types[name]} takes "
                              + ", ".join(COLUMN_DATATYPES[types[name]]))
        if not _counts(shape, (1, 2)) or shape[1:] not in ([], [1]):
            raise WrongInputs(f"input '{name}' must have shape [N] or [N, 1], got {shape!r}")
        if shape[0] == 0:
            raise BadRequest(f"input '{name}' has shape {shape}: a batch needs at least one row")
        first = next(iter(columns.items()), None)
        if first is not None and shape[0] != len(first[1]):
            raise WrongInputs(f"input '{name}' has {shape[0]} rows and input '{first[0]}' {len(first[1])}: "
                              "every feature needs the same N")
        columns[name] = _values(tensor, name, shape, datatype, tail, header).astype(np.float64)
    return np.column_stack([columns[name] for name in schema.names])


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _values(tensor: dict, name: str, shape: list[int], datatype: str, tail: BinaryTail, header: bytes) -> np.ndarray:
    """The input's values, flat, each finite and as many as its shape needs."""
    binary_size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
    if binary_size is not None:
        values = tail.take(binary_size, name, datatype)
    elif "data" in tensor:
        values = _json_values(tensor["data"], name, datatype, header)
    else:
        raise BadRequest(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    needed = math.prod(shape)
    if values.size != needed:
        raise BadRequest(f"input '{name}' has {values.size} values; shape {shape} needs {needed}")
    if not np.isfinite(values).all():
        raise BadRequest(f"input '{name}' has values that are not finite {datatype} numbers")
    return values.ravel()


def _parameters(entry: dict, what: str) -> dict:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{what} has parameters that are not a JSON object")
    return parameters


class BinaryTail:
    """The raw bytes after the JSON header, which the binary inputs take in the order the header lists them."""

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self.body = body
        self.header_length = header_length
        self.offset = len(body) if header_length is None else header_length
        self.taken = False

    def take(self, size: Any, name: str, datatype: str) -> np.ndarray:
        if self.header_length is None:
            raise BadRequest(f"input '{name}' has a binary_data_size but the request has no "
                             "Inference-Header-Content-Length")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input '{name}' binary_data_size must be a byte count, got {size!r}")
        left = len(self.body) - self.offset
        if size > left:
            after = "the JSON header" if self.offset == self.header_length else "the JSON header and the inputs before it"
            raise BadRequest(f"input '{name}' binary_data_size is {size} but {left} bytes follow {after}")
        dtype = FIXED_SIZE_DATATYPES[datatype]
        if size % dtype.itemsize:
            raise BadRequest(f"input '{name}' has {size} binary bytes, not a whole number of {datatype} values")
        values = np.frombuffer(self.body, dtype=dtype, count=size // dtype.itemsize, offset=self.offset)
        self.offset += size
        self.taken = True
        if datatype == "BOOL" and (values.view(np.uint8) > 1).any():
            raise BadRequest(f"input '{name}' has BOOL bytes other than 0 and 1")
        return values

    def check_consumed(self) -> None:
        if self.offset != len(self.body):
            raise BadRequest(f"{len(self.body) - self.offset} binary bytes follow the JSON header that no input's "
                             "binary_data_size claims")


def _json_values(data: Any, name: str, datatype: str, header: bytes) -> np.ndarray:
    """Numbers only (booleans for BOOL): numpy would read "1.5" and true as 1.5 and 1.0, so strings and booleans
    are refused; integer datatypes take integers in their range only."""
    dtype = FIXED_SIZE_DATATYPES[datatype]
    refused = BadRequest(f"input '{name}' data must be {datatype} {'booleans' if datatype == 'BOOL' else 'numbers'}, "
                         "flat or nested row-major")
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError):  # ragged nesting, integers beyond 64 bits
        raise refused from None
    if datatype == "BOOL":
        if values.dtype.kind != "b":
            raise refused
        return values
    if values.dtype.kind not in ("iu" if dtype.kind in "iu" else "iuf"):
        raise refused
    # A boolean among numbers hides as 1 or 0 in a numeric array; the header's text says whether to look.
    if (b"true" in header or b"false" in header) and any(value is True or value is False for value in _flat(data)):
        raise refused
    limits = np.iinfo(dtype.name) if dtype.kind in "iu" else None
    if limits is not None and values.size and not (limits.min <= values.min() and values.max() <= limits.max):
        raise BadRequest(f"input '{name}' has values outside the range of {datatype}")
    with np.errstate(over="ignore"):  # an FP32 overflow becomes inf, refused as not finite
        return values.astype(dtype, copy=False)


def _flat(data: Any) -> Iterable[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flat(item)
        else:
            yield item


def _requested_outputs(request: dict) -> tuple[dict[str, bool], bool]:
    binary_default = _parameters(request, "the request").get("binary_data_output", False) is True
    outputs = request.get("outputs")
    if outputs is None:
        return {}, binary_default
    if not isinstance(outputs, list) or not all(isinstance(output, dict) and isinstance(output.get("name"), str)
                                                for output in outputs):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    binary_by_output = {}
    for output in outputs:
        parameters = _parameters(output, f"output '{output['name']}'")
        if parameters.get("classification", parameters.get("class_count", 0)):
            raise BadRequest(f"output '{output['name']}' asks for classification, which this server does not offer")
        binary_by_output[output["name"]] = parameters.get("binary_data", binary_default) is True
    return binary_by_output, binary_default


def output_datatype(dtype: np.dtype) -> str:
    return OUTPUT_DATATYPES.get(dtype.kind, "BYTES")


def encode_infer_response(response: dict, outputs: list[tuple[str, str, np.ndarray]],
                          request: InferRequest) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """`response` (model_name, model_version, id) with each (name, datatype, array) of `outputs`, as JSON or,
    for the outputs `request` wants binary, as the binary extension; returns the body and its headers."""
    tensors, raw = [], []
    for name, datatype, array in outputs:
        tensor: dict[str, object] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.wants_binary(name):
            data = tensor_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    header = orjson.dumps({**response, "outputs": tensors})
    if not raw:
        return header, [JSON_CONTENT]
    return b"".join([header, *raw]), [(b"content-type", b"application/octet-stream"),
                                      (JSON_LENGTH_HEADER, str(len(header)).encode())]


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        encoded = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel().tolist()]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    return np.ascontiguousarray(array, dtype=FIXED_SIZE_DATATYPES[datatype]).tobytes()


def json_infer_request(request: InferRequest) -> bytes:
    """`request` as an all-JSON V2 body, for a server without the binary extension."""
    tensor = {"name": request.input_name, "datatype": "FP64", "shape": list(request.features.shape),
              "data": request.features.astype(np.float64).ravel().tolist()}
    body: dict[str, Any] = {"inputs": [tensor]}
    if request.binary_by_output:
        body["outputs"] = [{"name": name} for name in request.binary_by_output]
    if request.id is not None:
        body["id"] = request.id
    return orjson.dumps(body)


def model_metadata(name: str, version: str, schema: ModelSchema, classes: Any, output_shape: list[int]) -> bytes:
    """The V2 model metadata: one input per feature when the schema names them, else the one tensor."""
    inputs = ([{"name": feature.name, "datatype": FEATURE_DATATYPES[feature.type], "shape": [-1]}
               for feature in schema.features]
              or [{"name": "input-0", "datatype": "FP64", "shape": [-1, schema.n_features]}])
    return orjson.dumps({
        "name": name, "versions": [version], "platform": "sklearn", "inputs": inputs,
        "outputs": [{"name": "predict", "shape": output_shape,
                     "datatype": "FP64" if classes is None else output_datatype(np.asarray(classes).dtype)}],
    })


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def read_body(scope: dict, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (413) past `limit` before it is read, or as soon as it grows past it."""
    declared = header_value(scope["headers"], b"content-length")
    too_large = BadRequest(f"request body is larger than {limit} bytes; split the batch", status=413)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
