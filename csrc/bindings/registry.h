// Each kernel's binding file registers itself here, so that adding a kernel adds a file and
// touches no shared list. module.cpp runs every registrar inside PYBIND11_MODULE(_C, m).
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace stema::bindings {

using Registrar = void (*)(pybind11::module_&);

inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}

inline int add_registrar(Registrar registrar) {
  registrars().push_back(registrar);
  return 0;
}

// Cast a Python int holding a data pointer (tensor.data_ptr()) or a stream handle.
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace stema::bindings

#define STEMA_CONCAT_INNER_(a, b) a##b
#define STEMA_CONCAT_(a, b) STEMA_CONCAT_INNER_(a, b)

// STEMA_REGISTER_BINDINGS(m) { m.def(...); }
#define STEMA_REGISTER_BINDINGS(module_var)                                                   \
  static void STEMA_CONCAT_(stema_bind_, __LINE__)(pybind11::module_ & module_var);            \
  static const int STEMA_CONCAT_(stema_registered_, __LINE__) =                                \
      ::stema::bindings::add_registrar(&STEMA_CONCAT_(stema_bind_, __LINE__));                 \
  static void STEMA_CONCAT_(stema_bind_, __LINE__)(pybind11::module_ & module_var)
