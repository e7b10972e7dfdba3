// `tessera train --nproc N`: starts N local ranks of this same command line, each with the
// environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT: a free local port unless set), and watches them. A rank that ends in error
// or by a signal stops the others at once (SIGTERM, then SIGKILL after 5 s), and the launcher
// says which rank it was, how it ended, and exits 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

// argv: this process's whole command line; every "--nproc N" / "--nproc=N" is dropped from
// the ranks' copies. Returns the exit status.
int launch_ranks(std::int64_t nproc, const std::vector<std::string>& argv);

// The command line main() was given (cli/main.cpp records it).
std::vector<std::string>& command_line();

}  // namespace tessera
