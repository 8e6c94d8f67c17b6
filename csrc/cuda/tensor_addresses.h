// The torch side of a launch: a tensor list as the plain addresses and
// element counts the launcher (multi_tensor_apply.cuh) takes. Host code of the
// *_cuda.cu files only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fastaccum::cuda {

// Device addresses of a list: mutable_data_ptr for a list the kernel writes
// (it bumps the tensors' versions), const_data_ptr for one it only reads.
inline std::vector<void*> addresses(at::TensorList list, bool written) {
  std::vector<void*> out(list.size());
  for (size_t i = 0; i < list.size(); ++i)
    out[i] = written ? list[i].mutable_data_ptr()
                     : const_cast<void*>(list[i].const_data_ptr());
  return out;
}

inline std::vector<int64_t> numels(at::TensorList list) {
  std::vector<int64_t> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) out[i] = list[i].numel();
  return out;
}

}  // namespace fastaccum::cuda
