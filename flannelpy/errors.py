"""Error types shared across flannelpy; each names what is wrong."""


class FlannelError(Exception):
    """Base class: an error that the agent reports and exits on (exit code `exit_code`)."""

    exit_code = 1


class ConfigError(FlannelError):
    """The network config in etcd is invalid."""


class LeaseValueError(FlannelError):
    """A lease key or value in etcd cannot be decoded."""


class OutOfSubnets(FlannelError):
    """Every subnet between SubnetMin and SubnetMax is taken."""


class UsageError(FlannelError):
    """Bad command line; exits 2 like Go's flag package."""

    exit_code = 2


def first_flannel_error(group: BaseExceptionGroup) -> FlannelError | None:
    """The first FlannelError inside a (nested) exception group, or None.

    Tasks fail inside trio nurseries, which wrap errors in groups; callers and the exit code
    want the plain error that names what is wrong.
    """
    matched, _rest = group.split(FlannelError)
    exc: BaseException | None = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc  # type: ignore[return-value]  # split() leaves only FlannelError leaves
