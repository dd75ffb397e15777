"""Pretrained weights by name: the bundled catalog, downloads (Hugging Face Hub, URLs) and class names.

This package only fetches and describes files; turning them into models is the converters' job
(:func:`vitkit.from_pretrained`). The resolver calls :func:`fetch_source` for anything that is not a
local path.
"""

from vitkit.errors import ChecksumError, DownloadError, OfflineError
from vitkit.hub.catalog import (
                                CatalogEntry,
                                CatalogError,
                                Checksum,
                                Location,
                                find_entry,
                                get_entry,
                                list_entries,
                                load_catalog,
)
from vitkit.hub.classes import class_names
from vitkit.hub.download import (
                                cache_dir,
                                download_hub_file,
                                download_hub_repo,
                                download_url,
                                hf_cache_dir,
                                is_offline,
                                url_cache_path,
)
from vitkit.hub.resolve import HubSource, fetch_entry, fetch_hub_repo, fetch_source, fetch_url, is_hub_source

__all__ = [
    "CatalogEntry", "CatalogError", "Checksum", "ChecksumError", "DownloadError", "HubSource", "Location",
    "OfflineError", "cache_dir", "class_names", "download_hub_file", "download_hub_repo",
    "download_url", "fetch_entry", "fetch_hub_repo", "fetch_source", "fetch_url", "find_entry", "get_entry",
    "hf_cache_dir", "is_hub_source", "is_offline", "list_entries", "load_catalog", "url_cache_path",
]
