"""Programming language from a file name, over the languages of Seed-Coder's list (by extension).

The paper lists the languages but not the extension rules; this table uses each language's
common extensions (GitHub linguist's primary ones). Special file names (Makefile, Dockerfile,
CMakeLists.txt) are matched whole. Unknown extensions return None: the reader drops those files
with the reason ``unknown_language``.
"""

from __future__ import annotations

import os
from typing import Optional

EXTENSIONS = {
    "Ada": (".adb", ".ads"), "Agda": (".agda",), "Alloy": (".als",), "ANTLR": (".g4",),
    "AppleScript": (".applescript",), "Assembly": (".asm", ".s", ".S"), "Augeas": (".aug",),
    "Awk": (".awk",), "Batchfile": (".bat", ".cmd"), "Bluespec": (".bsv",), "C": (".c", ".h"),
    "C#": (".cs",), "C++": (".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx", ".h++"), "Clojure": (".clj", ".cljs", ".cljc"),
    "CMake": (".cmake",), "COBOL": (".cob", ".cbl"), "CoffeeScript": (".coffee",), "Common Lisp": (".lisp", ".lsp"),
    "CSS": (".css",), "CUDA": (".cu", ".cuh"), "Cython": (".pyx", ".pxd"), "D": (".d",), "Dart": (".dart",),
    "Dockerfile": (".dockerfile",), "Elixir": (".ex", ".exs"), "Elm": (".elm",), "Emacs Lisp": (".el",),
    "Erlang": (".erl", ".hrl"), "F#": (".fs", ".fsi", ".fsx"), "Fortran": (".f", ".f90", ".f95", ".for"),
    "GLSL": (".glsl", ".vert", ".frag"), "Go": (".go",), "Groovy": (".groovy", ".gradle"), "Haskell": (".hs",),
    "HTML": (".html", ".htm"), "Idris": (".idr",), "Isabelle": (".thy",), "Java": (".java",),
    "Java Server Pages": (".jsp",), "JavaScript": (".js", ".mjs", ".cjs", ".jsx"), "Julia": (".jl",),
    "Jupyter Notebook": (".ipynb",), "Kotlin": (".kt", ".kts"), "Lean": (".lean",), "Literate Agda": (".lagda",),
    "Literate CoffeeScript": (".litcoffee",), "Literate Haskell": (".lhs",), "Lua": (".lua",), "Makefile": (".mk",),
    "Maple": (".mpl",), "Markdown": (".md", ".markdown"), "Mathematica": (".nb", ".wl"), "MATLAB": (".m",),
    "Objective-C": (".mm",), "OCaml": (".ml", ".mli"), "Pascal": (".pas", ".pp"), "Perl": (".pl", ".pm"),
    "PHP": (".php",), "PowerShell": (".ps1", ".psm1"), "Prolog": (".pro", ".prolog"),
    "Protocol Buffer": (".proto",), "Python": (".py", ".pyi"), "R": (".r", ".R"), "RMarkdown": (".rmd", ".Rmd"),
    "Racket": (".rkt",), "Ruby": (".rb",), "Rust": (".rs",), "SAS": (".sas",), "SPARQL": (".sparql", ".rq"),
    "SQL": (".sql",), "Scala": (".scala", ".sc"), "Scheme": (".scm", ".ss"), "Shell": (".sh", ".bash", ".zsh"),
    "Smalltalk": (".st",), "Solidity": (".sol",), "Stan": (".stan",), "Standard ML": (".sml",),
    "Stata": (".do", ".ado"), "Swift": (".swift",), "SystemVerilog": (".sv", ".svh"), "Tcl": (".tcl",),
    "Tcsh": (".tcsh", ".csh"), "TeX": (".tex", ".sty", ".cls"), "Thrift": (".thrift",),
    "TypeScript": (".ts", ".tsx"), "VHDL": (".vhd", ".vhdl"), "Verilog": (".v", ".vh"),
    "Visual Basic": (".vb", ".vbs", ".bas"), "XSLT": (".xslt", ".xsl"), "YAML": (".yaml", ".yml"),
    "Yacc": (".y", ".yy"), "Zig": (".zig",), "reStructuredText": (".rst",),
}
FILENAMES = {"Makefile": "Makefile", "GNUmakefile": "Makefile", "Dockerfile": "Dockerfile",
             "CMakeLists.txt": "CMake", "Rakefile": "Ruby", "Gemfile": "Ruby"}
BY_EXTENSION = {ext: lang for lang, exts in EXTENSIONS.items() for ext in exts}


def language_of(path: str) -> Optional[str]:
    name = os.path.basename(path)
    if name in FILENAMES:
        return FILENAMES[name]
    _, ext = os.path.splitext(name)
    return BY_EXTENSION.get(ext) or BY_EXTENSION.get(ext.lower())
