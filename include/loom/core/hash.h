// Small, portable hashes for deterministic seeding (parameter initialisation, data shuffles, cache
// keys): the same value on every machine, compiler and standard library.
#pragma once

#include <cstdint>
#include <string>

namespace loom {

// splitmix64's finaliser: a bijective 64-bit mix.
uint64_t splitmix64(uint64_t x);

// FNV-1a, 64 bit.
uint64_t fnv1a64(const std::string& s);

}  // namespace loom
