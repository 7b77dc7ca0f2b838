"""PEFT adapter folders, merged from the files alone: no base model is loaded.

- :mod:`.reading`: open a folder lazily (config and safetensors header), read factors on demand,
  stream a safetensors file out.
- :mod:`.plan`: check that folders can be merged and plan every module (``--dry-run`` prints it).
- :mod:`.merging`: read, merge (any registered method) and write, module group by module group.
- :mod:`.output`: output folders that never replace what the tool did not write, never half-write
  and never race (``docs/design.md`` section 7).
"""

from .merging import MergeResult, merge_adapter_folders
from .output import OutputError, atomic_directory, check_output_dir
from .plan import MergePlan, plan_merge
from .reading import AdapterError, open_adapter_folder

__all__ = [
    "AdapterError",
    "MergePlan",
    "MergeResult",
    "OutputError",
    "atomic_directory",
    "check_output_dir",
    "merge_adapter_folders",
    "open_adapter_folder",
    "plan_merge",
]
