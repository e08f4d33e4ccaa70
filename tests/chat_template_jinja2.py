#!/usr/bin/env python3
"""Renders chat templates with Python's jinja2 set up as transformers'
apply_chat_template sets it up (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, tojson without HTML escaping or key sorting,
raise_exception, strftime_now), for tests/test_server_chat_template_jinja2.cpp.

stdin:  {"template": str, "cases": [{"messages": [...], "add_generation_prompt": bool,
         "bos_token": str, "eos_token": str[, "template": str]}, ...]}
        (a case's own "template" replaces the common one)
stdout: [{"ok": true, "text": str} | {"ok": false, "error": str}, ...]
Exit status 3 when jinja2 cannot be imported (the test skips).
"""
import json
import sys
from datetime import datetime

try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    sys.stderr.write("python3-jinja2 is not installed\n")
    sys.exit(3)


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    req = json.load(sys.stdin)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    common = env.from_string(req["template"]) if req.get("template") else None
    out = []
    for case in req["cases"]:
        tmpl = env.from_string(case["template"]) if "template" in case else common
        try:
            text = tmpl.render(messages=case["messages"], tools=None, documents=None,
                               add_generation_prompt=case["add_generation_prompt"],
                               bos_token=case["bos_token"], eos_token=case["eos_token"])
            out.append({"ok": True, "text": text})
        except TemplateError as e:
            out.append({"ok": False, "error": str(e)})
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
