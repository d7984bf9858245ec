// Python bindings of the in-place refit (python/stema_kernels/refit.py is the caller).
//
// A pair list arrives as five parallel lists: dst and src addresses (tensor.data_ptr()), counts
// (elements, or bytes for a same-dtype pair), dst and src dtype codes (stema::DType, or
// refit_raw_bytes for a same-dtype pair). A RefitPlan keeps a descriptor table instead: a buffer
// of refit_descriptor_bytes * count bytes, written once by refit_write_table_*.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "registry.h"
#include "stema/common.h"
#include "stema/refit.h"

namespace py = pybind11;
using stema::refit::RefitDescriptor;
using stema::refit::RefitPairs;

namespace {

RefitPairs make_pairs(std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src, std::vector<std::int64_t> counts,
                      std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
  return RefitPairs{std::move(dst), std::move(src), std::move(counts), std::move(dst_dtypes), std::move(src_dtypes)};
}

// Writes the descriptors of `pairs` into the host buffer at `table_address`; returns the chunk count.
std::int64_t write_table(std::uintptr_t table_address, const RefitPairs& pairs, std::int64_t chunk_bytes) {
  return stema::refit::describe_pairs(pairs, chunk_bytes, stema::bindings::as_ptr<RefitDescriptor>(table_address));
}

void refit_lists_cpu(std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src, std::vector<std::int64_t> counts,
                     std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
  const RefitPairs pairs = make_pairs(std::move(dst), std::move(src), std::move(counts), std::move(dst_dtypes),
                                      std::move(src_dtypes));
  std::vector<RefitDescriptor> table(pairs.counts.size());
  const std::int64_t total_chunks = stema::refit::describe_pairs(pairs, stema::refit::kCpuChunkBytes, table.data());
  stema::refit::refit_cpu(table.data(), static_cast<std::int64_t>(table.size()), total_chunks);
}

#if defined(STEMA_WITH_CUDA)
void refit_lists_cuda(std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src,
                      std::vector<std::int64_t> counts, std::vector<int> dst_dtypes, std::vector<int> src_dtypes,
                      int device_index, std::uintptr_t stream) {
  const RefitPairs pairs = make_pairs(std::move(dst), std::move(src), std::move(counts), std::move(dst_dtypes),
                                      std::move(src_dtypes));
  std::vector<RefitDescriptor> table(pairs.counts.size());
  const std::int64_t total_chunks = stema::refit::describe_pairs(pairs, stema::refit::kCudaChunkBytes, table.data());
  stema::refit::refit_cuda(table.data(), static_cast<std::int64_t>(table.size()), total_chunks, device_index, stream);
}
#endif

}  // namespace

STEMA_REGISTER_BINDINGS(m) {
  m.attr("refit_raw_bytes") = stema::refit::kRawBytes;
  m.attr("refit_descriptor_bytes") = static_cast<int>(sizeof(RefitDescriptor));

  m.def(
      "refit_check_pairs",
      [](std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src, std::vector<std::int64_t> counts,
         std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
        stema::refit::check_pairs(make_pairs(std::move(dst), std::move(src), std::move(counts), std::move(dst_dtypes),
                                             std::move(src_dtypes)));
      },
      py::arg("dst"), py::arg("src"), py::arg("counts"), py::arg("dst_dtypes"), py::arg("src_dtypes"),
      "Raises ValueError for bad codes or counts and for overlaps (a dst with another dst or any "
      "src), as every refit function does before it copies; for callers that copy another way.");
  m.def("refit_cpu", &refit_lists_cpu, py::arg("dst"), py::arg("src"), py::arg("counts"), py::arg("dst_dtypes"),
        py::arg("src_dtypes"), py::call_guard<py::gil_scoped_release>(),
        "Copies every src buffer into its dst buffer (CPU, one OpenMP region).");
  m.def(
      "refit_write_table_cpu",
      [](std::uintptr_t table_address, std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src,
         std::vector<std::int64_t> counts, std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
        return write_table(table_address, make_pairs(std::move(dst), std::move(src), std::move(counts),
                                                     std::move(dst_dtypes), std::move(src_dtypes)),
                           stema::refit::kCpuChunkBytes);
      },
      py::arg("table"), py::arg("dst"), py::arg("src"), py::arg("counts"), py::arg("dst_dtypes"),
      py::arg("src_dtypes"),
      "Writes the descriptor table of a CPU plan into the host buffer `table`; returns its chunk count.");
  m.def(
      "refit_table_cpu",
      [](std::uintptr_t table_address, std::int64_t count, std::int64_t total_chunks) {
        stema::refit::refit_cpu(stema::bindings::as_ptr<const RefitDescriptor>(table_address), count, total_chunks);
      },
      py::arg("table"), py::arg("count"), py::arg("total_chunks"), py::call_guard<py::gil_scoped_release>(),
      "Runs a CPU plan's descriptor table (written by refit_write_table_cpu).");

  m.def(
      "refit_pack_rows_cpu",
      [](std::vector<std::uintptr_t> packed, std::vector<std::uintptr_t> src,
         std::vector<std::int64_t> rows, std::vector<std::int64_t> cols, std::vector<std::int64_t> block,
         std::vector<std::int64_t> pair, std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
        const std::size_t count = packed.size();
        STEMA_CHECK(src.size() == count && rows.size() == count && cols.size() == count &&
                        block.size() == count && pair.size() == count && dst_dtypes.size() == count &&
                        src_dtypes.size() == count,
                    "refit_pack_rows_cpu: the argument lists differ in length");
        std::vector<stema::refit::PackRowsDescriptor> table(count);
        for (std::size_t i = 0; i < count; ++i) {
          table[i] = {reinterpret_cast<void*>(packed[i]), reinterpret_cast<const void*>(src[i]), rows[i], cols[i], block[i], pair[i], dst_dtypes[i],
                      src_dtypes[i]};
        }
        py::gil_scoped_release release;
        stema::refit::pack_rows_cpu(table.data(), static_cast<std::int64_t>(count));
      },
      py::arg("packed"), py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("block"),
      py::arg("pair"), py::arg("dst_dtypes"), py::arg("src_dtypes"),
      "Packs each row-major src [rows, cols] into the row-block layout at `packed`, casting; see "
      "PackRowsDescriptor.");

#if defined(STEMA_WITH_CUDA)
  m.def("refit_cuda", &refit_lists_cuda, py::arg("dst"), py::arg("src"), py::arg("counts"), py::arg("dst_dtypes"),
        py::arg("src_dtypes"), py::arg("device_index"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Copies every src buffer into its dst buffer on `stream` (descriptors passed by value: one "
        "launch per refit_max_descriptors_per_launch pairs).");
  m.attr("refit_max_descriptors_per_launch") = stema::refit::kMaxDescriptorsPerLaunch;
  m.def(
      "refit_write_table_cuda",
      [](std::uintptr_t table_address, std::vector<std::uintptr_t> dst, std::vector<std::uintptr_t> src,
         std::vector<std::int64_t> counts, std::vector<int> dst_dtypes, std::vector<int> src_dtypes) {
        return write_table(table_address, make_pairs(std::move(dst), std::move(src), std::move(counts),
                                                     std::move(dst_dtypes), std::move(src_dtypes)),
                           stema::refit::kCudaChunkBytes);
      },
      py::arg("table"), py::arg("dst"), py::arg("src"), py::arg("counts"), py::arg("dst_dtypes"),
      py::arg("src_dtypes"),
      "Writes the descriptor table of a CUDA plan into the HOST buffer `table` (the caller uploads "
      "it); returns its chunk count.");
  m.def(
      "refit_table_cuda",
      [](std::uintptr_t device_table_address, std::int64_t count, std::int64_t total_chunks, int device_index,
         std::uintptr_t stream) {
        stema::refit::refit_table_cuda(stema::bindings::as_ptr<const RefitDescriptor>(device_table_address), count,
                                       total_chunks, device_index, stream);
      },
      py::arg("table"), py::arg("count"), py::arg("total_chunks"), py::arg("device_index"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Runs a CUDA plan's descriptor table, uploaded to the device, in one launch on `stream`.");
#endif
}
