"""Chat templates and the encoding of one record: ids, labels, image placeholders, truncation.

Templates (MindSpeed-MM's ``qwen2vl`` and ``qwen3_vl_nothink``) give a slot per role; a record is
encoded turn pair by turn pair, each slot tokenised on its own (``add_special_tokens=False``):
the first prompt is the system slot (the record's system prompt, else the template's default) and
the user slot, an answer is the assistant slot. Each ``<image>`` becomes ``<|vision_start|>``, one
``<|image_pad|>`` per merged patch of its image, ``<|vision_end|>``.

Labels are the ids of the answers and -100 elsewhere (``train_on_prompt`` keeps the prompts too;
``mask_history`` keeps only the last answer). Sequences longer than the cut-off (--seq-length) are
shortened pair by pair as MindSpeed-MM does (a long answer keeps its room when it fits in half the
budget, else the prompt does, else both shrink in proportion; later pairs are dropped once the budget
is spent; with ``mask_history`` the last pair is kept first). Cutting into an image's placeholder is a
:class:`mm_train.errors.DataError`: the record does not fit with its images.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm_train.data.mllm.records import IMAGE_PLACEHOLDER, Record
from mm_train.errors import DataError

IGNORE_INDEX = -100
CONTENT = "{{content}}"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class Template:
    """The text around each role's content (``{{content}}`` marks where it goes)."""

    user: str
    assistant: str
    system: str
    observation: str
    default_system: str = ""

    def prompt_slot(self, role: str) -> str:
        """The slot of a prompt turn (user or observation)."""
        return self.observation if role == "observation" else self.user


_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_ASSISTANT = "{{content}}<|im_end|>\n"
_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"

TEMPLATES = {
    "qwen2vl": Template(_USER, _ASSISTANT, _SYSTEM,
                        observation="<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
                        default_system="You are a helpful assistant."),
    "qwen3_vl_nothink": Template(_USER, _ASSISTANT, _SYSTEM,
                                 observation="<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response>"
                                             "<|im_end|>\n<|im_start|>assistant\n"),
}


def budget_split(source: int, target: int, budget: int) -> tuple[int, int]:
    """(prompt, answer) lengths kept of a pair of ``source`` and ``target`` tokens within ``budget``."""
    if 2 * target < budget:
        answer_room = budget
    elif 2 * source < budget:
        answer_room = budget - source
    else:
        answer_room = int(budget * target / (source + target))
    answer = min(answer_room, target)
    return min(max(budget - answer, 0), source), answer


class RecordEncoder:
    """Turns a :class:`Record` into (input ids, labels) with ``tokenizer`` and ``template``.

    ``cutoff_len``: the most tokens a sequence keeps; ``image_tokens(record)``: the placeholder
    count of each image of a record.
    """

    def __init__(self, tokenizer, template: Template, cutoff_len: int, train_on_prompt: bool,
                 mask_history: bool) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)

    def _ids(self, slot: str, content: str) -> list[int]:
        return self.tokenizer.encode(slot.replace(CONTENT, content), add_special_tokens=False)

    @staticmethod
    def _expand(turns: tuple[tuple[str, str], ...], image_tokens: list[int]) -> list[tuple[str, str]]:
        counts = iter(image_tokens)
        expanded = []
        for role, content in turns:
            pieces = content.split(IMAGE_PLACEHOLDER)
            text = pieces[0]
            for piece in pieces[1:]:
                text += VISION_START + IMAGE_PAD * next(counts) + VISION_END + piece
            expanded.append((role, text))
        return expanded

    def _pairs(self, record: Record, image_tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        turns = self._expand(record.turns, image_tokens)
        system = record.system or self.template.default_system
        pairs = []
        for index in range(0, len(turns), 2):
            (role, prompt), (_, answer) = turns[index], turns[index + 1]
            source = self._ids(self.template.system, system) if index == 0 and system else []
            source += self._ids(self.template.prompt_slot(role), prompt)
            pairs.append((source, self._ids(self.template.assistant, answer)))
        return pairs

    def encode(self, record: Record, image_tokens: list[int]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of ``record``, at most ``cutoff_len`` long."""
        pairs = self._pairs(record, image_tokens)
        order = list(reversed(pairs)) if self.mask_history else pairs
        ids: list[int] = []
        labels: list[int] = []
        used = 0
        for turn, (source, target) in enumerate(order):
            if used >= self.cutoff_len:
                break
            source_len, target_len = budget_split(len(source), len(target), self.cutoff_len - used)
            source, target = source[:source_len], target[:target_len]
            used += source_len + target_len
            source_labels = source if self.train_on_prompt else [IGNORE_INDEX] * source_len
            target_labels = [IGNORE_INDEX] * target_len if self.mask_history and turn > 0 else target
            if self.mask_history:
                ids, labels = source + target + ids, source_labels + target_labels + labels
            else:
                ids, labels = ids + source + target, labels + source_labels + target_labels
        expected = sum(image_tokens)
        if ids.count(self.image_pad_id) != expected or ids.count(self.vision_end_id) != len(image_tokens):
            full = sum(len(source) + len(target) for source, target in pairs)
            raise DataError(f"{record.where}: {full} tokens with its images do not fit in --seq-length "
                            f"{self.cutoff_len} without cutting an image; raise --seq-length or lower image_max_pixels")
        return ids, labels
