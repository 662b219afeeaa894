"""`runner`: convert, quantize, plan, embed and serve from the shell. A thin shell over quantize/, planner/ and
runner/: each command parses its options and calls one function that does the work.

The group imports a command's module only when it is run or listed (`runner --help`): no command module
imports FastAPI, Ray or llama.cpp at import time, so `runner plan` never loads the server nor the engine.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from quantize.errors import UserError

# Each command's home, "module:attribute", imported when used.
COMMANDS = {
    "calibrate": "runner.cli.plan:calibrate",
    "convert": "runner.cli.models:convert",
    "embed": "runner.cli.embed:embed",
    "embed-dataset": "runner.cli.embed:embed_dataset_cmd",
    "imatrix": "runner.cli.imatrix:imatrix",
    "models": "runner.cli.models:models",
    "plan": "runner.cli.plan:plan_cmd",
    "quantize": "runner.cli.models:quantize",
    "retention": "runner.cli.retention:retention",
    "rm": "runner.cli.models:rm_cmd",
    "serve": "runner.cli.serve:serve",
    "verify": "runner.cli.models:verify",
}


class _OneLine(logging.Formatter):
    """`warning: message` on stderr, as the CLI's own errors read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"


def one_line(message: object) -> str:
    """MESSAGE with line breaks and control characters escaped: an error is one line, and text from a hostile
    file (a key, a name) must not drive the terminal with escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


class _Cli(click.Group):
    """Loads commands lazily; turns UserError into one line and a non-zero exit; tracebacks only with --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        def debug() -> bool:  # known once the group's own options are parsed, inside super().invoke
            return bool(ctx.obj and ctx.obj.get("debug"))

        try:
            return super().invoke(ctx)
        except UserError as e:
            if debug():
                raise
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(1)
        except click.BadParameter as e:
            # An option's own range or choice said no (click.IntRange, click.Choice): one line naming it, as ours.
            name = e.param.opts[0] if isinstance(e.param, click.Option) else e.param_hint or "argument"
            click.echo(f"error: {one_line(name)} {one_line(e.message)}", err=True)
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:
            # Ctrl-C: say what is safe and how to go on (a command may say it in E), and exit as Unix tools do.
            click.echo(f"interrupted{': ' + str(e) if str(e) else ''}", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`runner models | head -3`): stop quietly, as Unix tools do; stdout goes
            # to /dev/null so the interpreter's last flush does not fail a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a tool a closed pipe stopped
        except OSError as e:  # the file system said no (permissions, a full disk): name the file
            if debug():
                raise
            click.echo(f"error: {one_line(f'{e.filename}: ' if e.filename else '')}{e.strerror or e}", err=True)
            sys.exit(1)
        except Exception as e:
            if debug():
                raise
            click.echo(f"error: {type(e).__name__}: {one_line(e)} (rerun with --debug for a traceback)", err=True)
            sys.exit(2)


def version_text() -> str:
    """This project's version, llama-cpp-python's, and what its ggml was built for: the CPU features it uses and
    whether it can offload to a GPU (a CPU-only build cannot, whatever the machine has)."""
    from importlib.metadata import version

    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 | ": the features set to 1 (a backend's name before a colon).
    fields = (f.partition("=") for f in info.split("|"))
    flags = [name.split(":")[-1].strip() for name, _, value in fields if value.strip() == "1"]
    gpu = "yes" if llama_cpp.llama_supports_gpu_offload() else "no"
    return (
        f"llm-embed-runner {version('llm-embed-runner')}\n"
        f"llama-cpp-python {llama_cpp.__version__}; ggml: {' '.join(flags) or '?'}; GPU offload: {gpu}"
    )


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=_Cli)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
    help="Show the versions of this project and llama-cpp-python, and what its ggml was built for.",
)  # fmt: skip
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run LLM text embedders through llama.cpp."""
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("runner")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
