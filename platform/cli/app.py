"""The `hidrop` command: the typer app, the list of its commands (each lives in the module of its
group), and the one place where a UserError becomes `error: <message>` on stderr and exit status 2."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

import hidrop_platform.cli.bench as bench
import hidrop_platform.cli.config as config
import hidrop_platform.cli.demo as demo
import hidrop_platform.cli.run as run
import hidrop_platform.cli.search as search
import hidrop_platform.cli.store as store
import hidrop_platform.cli.views as views
from hidrop.errors import UserError


class HidropGroup(TyperGroup):
    """The top-level group: every command, the bench ones included, runs inside its invoke. Both ways in
    pass here: the console script calling `app` and tests calling CliRunner().invoke(app, ...)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            views.print_error(str(e))
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=HidropGroup, add_completion=False, no_args_is_help=True, help="Vision-token schedules for LLaVA-style models."
)
app.command()(config.validate)
app.command()(config.flops)
app.command("eval")(run.eval_command)
app.command()(run.train)
app.command("tune")(search.tune_command)
app.command("analyze")(run.analyze_command)
app.command("compare")(run.compare_command)
app.command("proxy")(search.proxy_command)
app.command("report")(store.report_command)
app.command("sync")(store.sync_command)
app.command("ui")(store.ui_command)
app.command("demo")(demo.demo_command)

bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks (ratios measured in one run).")
bench_app.command("prefill")(bench.bench_prefill)
bench_app.command("generate")(bench.bench_generate)
bench_app.command("train")(bench.bench_train)
bench_app.command("overhead")(bench.bench_overhead)
bench_app.command("search")(bench.bench_search)
app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover
    app(prog_name="hidrop")
