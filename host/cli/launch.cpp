#include "cli/launch.h"

#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace tessera {

std::vector<std::string>& command_line() {
  static std::vector<std::string> argv;
  return argv;
}

namespace {

// A port the kernel says is free now (bound to port 0, then released for rank 0's TCPStore).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("--nproc: no socket to find a free port with: " + std::string(std::strerror(errno)));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  if (!ok) throw std::runtime_error("--nproc: could not find a free port: " + std::string(std::strerror(errno)));
  return ntohs(a.sin_port);
}

std::string how_it_ended(int status) {
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

pid_t start_rank(const std::vector<std::string>& args, std::int64_t rank, std::int64_t nproc, const std::string& addr, const std::string& port) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("--nproc: fork failed: " + std::string(std::strerror(errno)));
  if (pid > 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher killed takes its ranks with it
  ::setenv("RANK", std::to_string(rank).c_str(), 1);
  ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
  ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  ::setenv("MASTER_ADDR", addr.c_str(), 1);
  ::setenv("MASTER_PORT", port.c_str(), 1);
  std::vector<char*> cargs;
  for (const auto& a : args) cargs.push_back(const_cast<char*>(a.c_str()));
  cargs.push_back(nullptr);
  ::execv("/proc/self/exe", cargs.data());
  std::fprintf(stderr, "--nproc: could not start rank %lld: %s\n", static_cast<long long>(rank), std::strerror(errno));
  std::_Exit(127);
}

void stop(const std::vector<pid_t>& pids) {
  for (const pid_t p : pids)
    if (p > 0) ::kill(p, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (const pid_t p : pids) {
    if (p <= 0) continue;
    int status = 0;
    while (::waitpid(p, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(p, SIGKILL);
        ::waitpid(p, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

}  // namespace

int launch_ranks(std::int64_t nproc, const std::vector<std::string>& argv) {
  std::vector<std::string> args;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    if (argv[i] == "--nproc") {
      ++i;
      continue;
    }
    if (argv[i].rfind("--nproc=", 0) == 0) continue;
    args.push_back(argv[i]);
  }
  const char* addr_env = std::getenv("MASTER_ADDR");
  const char* port_env = std::getenv("MASTER_PORT");
  const std::string addr = addr_env != nullptr && *addr_env ? addr_env : "127.0.0.1";
  const std::string port = port_env != nullptr && *port_env ? port_env : std::to_string(free_port());
  std::vector<pid_t> pids;
  try {
    for (std::int64_t r = 0; r < nproc; ++r) pids.push_back(start_rank(args, r, nproc, addr, port));
  } catch (...) {
    stop(pids);
    throw;
  }
  auto running = [&] { return std::any_of(pids.begin(), pids.end(), [](pid_t p) { return p > 0; }); };
  while (running()) {
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, 0);
    if (done < 0) throw std::runtime_error("--nproc: waiting for the ranks failed: " + std::string(std::strerror(errno)));
    std::size_t rank = 0;
    while (rank < pids.size() && pids[rank] != done) ++rank;
    if (rank == pids.size()) continue;  // not a rank
    pids[rank] = -1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
    stop(pids);
    spdlog::error("rank {} of {} (pid {}) {}: the other ranks were stopped", rank, nproc, done, how_it_ended(status));
    return 1;
  }
  return 0;
}

}  // namespace tessera
