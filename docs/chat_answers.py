"""The teacher's and the ternary student's answers to the same chat prompts, greedy, through
the code `wft serve --backend torch` runs (the student with packed int8 codes).

    python docs/chat_answers.py smollm2_135m_cpu            # runs/smollm2_135m_cpu/<last stage>
    python docs/chat_answers.py smollm2_135m_cpu --markdown # as a README table
"""

from __future__ import annotations

import argparse

from wftool.model.loading import load_source_model
from wftool.recipe import load_recipe
from wftool.serve.engine_torch import TorchEngine
from wftool.serve.generation import Generation, Sampling, generate
from wftool.stage_registry import STUDENT_STAGES, final_dir

PROMPTS = ("What is the capital of France?",
           "What is a Python list?",
           "How do I install a package on Debian?")


def answer(engine: TorchEngine, prompt: str, max_tokens: int) -> str:
    text = engine.render_chat([{"role": "user", "content": prompt}])
    request = Generation(engine.encode(text, chat=True), max_tokens, Sampling(temperature=0.0),
                         chat=True)
    return "".join(piece.text for piece in generate(engine, request)).strip()


def newest_student(recipe):
    for stage in reversed([s.name for s in STUDENT_STAGES if s.name in recipe.stages]):
        path = final_dir(recipe, stage)
        if (path / "config.json").exists():
            return stage, path
    raise SystemExit(f"error: no trained stage under {recipe.output_dir}/{recipe.name}; run "
                     f"`wft pipeline {recipe.name}` first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    model, tokenizer, _ = load_source_model(recipe.model)
    teacher = TorchEngine(model, tokenizer)
    stage, path = newest_student(recipe)
    student = TorchEngine.load(path)
    rows = [(p, answer(teacher, p, args.max_tokens), answer(student, p, args.max_tokens))
            for p in PROMPTS]
    if args.markdown:
        print(f"| prompt | teacher | student after {stage} |\n|---|---|---|")
        for prompt, by_teacher, by_student in rows:
            cells = [c.replace("\n", " ").replace("|", "\\|") for c in
                     (prompt, by_teacher, by_student)]
            print("| " + " | ".join(cells) + " |")
        return
    for prompt, by_teacher, by_student in rows:
        print(f"## {prompt}\nteacher: {by_teacher}\nstudent ({stage}): {by_student}\n")


if __name__ == "__main__":
    main()
