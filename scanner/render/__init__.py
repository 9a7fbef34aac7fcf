"""A verdict for people and tools: plain text (CLI), SARIF 2.1.0 (code-scanning UIs), a self-contained HTML page.

Renderers read a :class:`~scanner.verdict.Verdict` (or its JSON) and nothing else; none of them needs torch.
"""
