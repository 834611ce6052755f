// Files replaced atomically: the new content goes to "<path>.tmp", then a
// rename puts it in place, so a reader (or a crash) sees the old file or the
// new one, never a mix. With `sync`, the data and the rename are on disk
// before the call returns.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string_view>

namespace zinf {

// The pieces are written one after another.
void replace_file(const std::filesystem::path& path, std::span<const std::span<const std::byte>> pieces,
                  bool sync);
void replace_file(const std::filesystem::path& path, std::string_view text, bool sync);

// fsync of a directory, so entries created or renamed in it are durable.
void sync_directory(const std::filesystem::path& directory);

}  // namespace zinf
