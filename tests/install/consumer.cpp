// Built against an *installed* Loom: bootstraps, builds a layout and all-reduces over the world.
#include <loom/comm/bootstrap.h>
#include <loom/core/config.h>
#include <loom/core/logging.h>
#include <loom/mesh/process_groups.h>

#include <cstdio>

int main(int argc, char** argv) {
  auto config = loom::config::load_job_config("", {"parallel.tp=1", "comm.timeout_s=60"});
  loom::comm::Bootstrap boot(loom::comm::BootstrapOptions::from_config(config.comm()), &argc, &argv);
  loom::log::init(loom::log::LogOptions::from_config(config.logging(), boot.rank(), boot.size()));
  auto dims = loom::mesh::ParallelDims::from_config(config.parallel(), boot.size());
  loom::mesh::ProcessGroups groups(dims, boot.world());
  at::Tensor t = at::ones({4});
  groups.dp_group()->all_reduce(t);
  bool ok = t[0].item<float>() == static_cast<float>(groups.dp_size());
  std::printf("consumer: %s, dp sum %s\n", dims.to_string().c_str(), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
