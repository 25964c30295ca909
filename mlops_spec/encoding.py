"""Numbers as the Docker provider reads them back: a value rendered any other way is a diff on every `pulumi up`."""
from __future__ import annotations

NANO = 1_000_000_000


def provider_cpus(cpus: float) -> str:
    """`cpus` exactly as the Docker provider reads it back (`nano_text` of its nano-CPUs). `cpus` is ForceNew, so
    rendering it any other way replaces the container on every `pulumi up`."""
    return nano_text(round(cpus * NANO))


def nano_text(nanos: int) -> str:
    """Nano-units as terraform-provider-docker v4.5.0 writes them (internal/provider/helpers.go
    nanoInt64ToDecimalString, which resourceDockerContainerRead applies to NanoCPUs): nine decimals; when that string
    holds exactly nine zeros it is re-rendered with one decimal (1 -> "1.0", 0.05 -> "0.1"), otherwise trailing zeros
    are cut (1.5 -> "1.5", 10 -> "10.")."""
    if nanos == 0:
        return "0"
    nine_decimals = f"{nanos // NANO}.{nanos % NANO:09d}"
    if nine_decimals.count("0") == 9:
        tenths = (nanos + NANO // 20) // (NANO // 10)  # big.Rat.FloatString rounds half away from zero
        return f"{tenths // 10}.{tenths % 10}"
    return nine_decimals.rstrip("0")


def parse_cpus(text: str) -> int:
    """Nano-CPUs of a provider `cpus` string, as Docker's opts.ParseCPUs reads it."""
    whole, _, fraction = text.partition(".")
    return int(whole or "0") * NANO + int((fraction + "0" * 9)[:9])
