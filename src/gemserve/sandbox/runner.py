"""The program that runs inside the sandbox: it sets the limits, runs the code from stdin, and reports.

It is passed to the sandbox's Python with `-c` (it is not imported by gemserve), so it depends on nothing but
the standard library and matplotlib when the code used it. Its one argument is a JSON object: the resource
limits to set (`resource` names to values) and the file descriptor for its report. The code's stdout and
stderr are one stream, as a terminal shows them. The report, written when the code ends, is one JSON object:
`{"ok": bool, "figures": [base64 PNG, ...]}`; a run killed from outside writes none.
"""

import ast
import base64
import io
import json
import os
import resource
import sys
import traceback


def set_limits(limits):
    for name, value in limits.items():
        # CPU time: SIGXCPU at the soft limit, which the server reads as the deadline; SIGKILL a second later.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))


def figures():
    """Every open matplotlib figure as PNG bytes, as plots are shown at Google: no plt.show() needed."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    pngs = []
    for number in pyplot.get_fignums():
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        pngs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pngs


def execute(code, scope):
    """Runs the code; a last line that is an expression has its value printed, as in a notebook (models often
    end with the expression they want to see rather than print it)."""
    tree = ast.parse(code, "<string>")
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, "<string>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<string>", "eval"), scope)
        if value is not None:
            print(repr(value))


def run(code):
    """True when the code ran to its end (or exited with status 0)."""
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        execute(code, scope)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(exc.code if isinstance(exc.code, str) else f"exit status {exc.code}", file=sys.stderr)
            return False
    except BaseException as exc:  # the traceback is the output, as Python prints it, without this file's frame
        traceback.print_exception(type(exc), exc, _user_frames(exc.__traceback__, scope))
        return False
    return True


def _user_frames(tb, scope):
    """The traceback from the first frame of the code itself (none for a syntax error: the error shows where)."""
    while tb is not None and tb.tb_frame.f_globals is not scope:
        tb = tb.tb_next
    return tb


def main():
    settings = json.loads(sys.argv[1])
    report = os.fdopen(settings["report_fd"], "w")
    code = sys.stdin.read()
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.dup2(1, 2)
    set_limits(settings["limits"])
    parent = os.getpid()
    ok = run(code)
    if os.getpid() != parent:  # a process the code forked, leaving the code: only the first one reports
        os._exit(0)
    try:
        pngs = figures()
    except Exception:
        traceback.print_exc()
        pngs = []
    sys.stdout.flush()
    report.write(json.dumps({"ok": ok, "figures": pngs}))
    report.close()
    os._exit(0)


main()
