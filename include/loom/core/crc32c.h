// CRC-32C (Castagnoli, the iSCSI / ext4 / TFRecord polynomial 0x1EDC6F41), as used by checkpoint
// integrity checks and TensorBoard records. The SSE4.2 crc32 instruction computes it at several
// GB/s where the CPU has it (checked at run time); a table-driven loop elsewhere. Both give the
// standard value: crc32c("123456789") = 0xE3069283.
#pragma once

#include <cstddef>
#include <cstdint>

namespace loom {

// The CRC of `size` bytes at `data`, continuing from `crc` (the CRC of the bytes before; 0 for
// none): crc32c(ab) == crc32c(b, crc32c(a)).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

// The table-driven version (the reference the hardware path is tested against).
uint32_t crc32c_portable(const void* data, size_t size, uint32_t crc = 0);

}  // namespace loom
