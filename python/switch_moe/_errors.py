"""The exceptions of switch_moe: one per kind of error of the crate, each carrying its
message. Those about the caller's arguments are also ValueErrors."""


class MoeError(Exception):
    """Any error of the layer."""


class ConfigError(MoeError, ValueError):
    """A config key has a value outside its domain, or is unknown."""


class TensorError(MoeError, ValueError):
    """A weight tensor is missing, misshapen or not finite, or the naming is unknown."""


class InputError(MoeError, ValueError):
    """The input has a shape the layer cannot take, or is not finite."""


class TrainingError(MoeError):
    """A backward the layer cannot run: weights not in f32, no forward before it, a
    batch that ran in chunks."""


class UnsupportedError(MoeError, ValueError):
    """A torch module whose computation the layer cannot express (an activation, a gate, a
    norm or a routing it does not have); the message names the module and what it met."""


class FileError(MoeError, OSError):
    """A file could not be read or written."""


class DeviceError(MoeError, RuntimeError):
    """No GPU adapter, a device limit, or a device failure."""
