// hostdev: a second device for CPU-only CI, registered on PyTorch's PrivateUse1 dispatch key.
//
// Its memory is ordinary host memory, but every tensor on it reports device `hostdev:0`, so PyTorch treats
// it as a separate device exactly as it treats CUDA: an op that meets tensors of two devices, a random op on
// a CPU tensor with a hostdev generator, or on a hostdev tensor with a CPU generator, raises. That is the
// class of bug a CUDA cluster finds at its first step (dmdr/schedules.py once drew `_standard_gamma` on a
// CPU tensor with the trainer's device generator) and CPU-only CI never did.
//
// Design (after PyTorch's open-registration test extension, torch_openreg, written from its ideas):
// - an allocator that hands out host memory tagged with the PrivateUse1 device;
// - the handful of kernels that must not copy (empty, views, copies between devices, set_, resize_, item);
// - every other op through one boxed fallback that checks device agreement first (the check CUDA kernels
//   and TensorIterator make), swaps a hostdev generator for the CPU generator it wraps, and then runs the
//   CPU kernel on host aliases (at::native::cpu_fallback), refusing ops that would return views of a copy;
// - a generator that wraps a CPU generator: same stream, state and seeds, but its device is hostdev, so
//   the CPU kernels refuse it unless the fallback above unwraps it (i.e. unless the tensors are hostdev).

#include <ATen/CPUFunctions.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/copy_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

namespace hostdev {

constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;
const c10::Device kDevice(kType, 0);
std::atomic<int64_t> g_fallback_calls{0};

// ----------------------------------------------------------------------------------------------- memory
void free_host(void* ptr) { c10::free_cpu(ptr); }

struct Allocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
    return {ptr, ptr, &free_host, kDevice};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_host; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
Allocator g_allocator;
REGISTER_ALLOCATOR(kType, &g_allocator)

// A CPU tensor over a hostdev tensor's memory (same sizes, strides, offset): how kernels read it.
at::Tensor host_alias(const at::Tensor& t) {
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(at::kCPU));
}

// ----------------------------------------------------------------------------------------------- device guard
thread_local c10::DeviceIndex g_current = 0;

struct GuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kType; }
  c10::Device exchangeDevice(c10::Device d) const override {
    auto old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return {kType, g_current}; }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kType && d.index() == 0, "hostdev has one device, hostdev:0; got ", d);
    g_current = 0;
  }
  void uncheckedSetDevice(c10::Device) const noexcept override { g_current = 0; }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream getDefaultStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  // Work on hostdev is synchronous: events are complete as soon as they are recorded.
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

// ----------------------------------------------------------------------------------------------- generator
// A hostdev generator owns a CPU generator and forwards everything to it; only its device differs.
struct Generator final : c10::GeneratorImpl {
  explicit Generator(at::Generator cpu)
      : c10::GeneratorImpl(kDevice, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)), cpu_(std::move(cpu)) {}
  void set_current_seed(uint64_t seed) override { cpu_.unsafeGetGeneratorImpl()->set_current_seed(seed); }
  void set_offset(uint64_t offset) override { cpu_.unsafeGetGeneratorImpl()->set_offset(offset); }
  uint64_t get_offset() const override { return cpu_.unsafeGetGeneratorImpl()->get_offset(); }
  uint64_t current_seed() const override { return cpu_.unsafeGetGeneratorImpl()->current_seed(); }
  uint64_t seed() override { return cpu_.unsafeGetGeneratorImpl()->seed(); }
  void set_state(const c10::TensorImpl& state) override { cpu_.unsafeGetGeneratorImpl()->set_state(state); }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    return cpu_.unsafeGetGeneratorImpl()->get_state();
  }
  Generator* clone_impl() const override { return new Generator(cpu_.clone()); }
  at::Generator cpu_;
};

at::Generator new_generator() { return at::make_generator<Generator>(at::detail::createCPUGenerator()); }

// ----------------------------------------------------------------------------------------------- hooks
struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
  // The default hostdev generator shares the default CPU generator's stream (torch.manual_seed seeds both).
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    static at::Generator g = at::make_generator<Generator>(at::detail::getDefaultCPUGenerator());
    return g;
  }
  at::Generator getNewGenerator(c10::DeviceIndex) const override { return new_generator(); }
  at::Device getDeviceFromPtr(void*) const override { return kDevice; }
  bool isPinnedPtr(const void*) const override { return false; }
  at::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    auto* impl = storage.unsafeGetStorageImpl();
    TORCH_CHECK(impl->resizable(), "hostdev: trying to resize storage that is not resizable");
    at::DataPtr fresh = g_allocator.allocate(newsize);
    size_t keep = std::min(newsize, impl->nbytes());
    if (keep) std::memcpy(fresh.get(), impl->data(), keep);
    impl->set_data_ptr_noswap(std::move(fresh));
    impl->set_nbytes(newsize);
  }
};

bool register_hooks() {
  at::RegisterPrivateUse1HooksInterface(new Hooks());
  return true;
}
const bool g_hooks_registered = register_hooks();

// ----------------------------------------------------------------------------------------------- kernels
at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                               std::optional<bool> pin_memory, std::optional<c10::MemoryFormat> memory_format) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided, "hostdev: strided tensors only");
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory), "hostdev: pinned memory is CPU memory");
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                         std::optional<bool> pin_memory) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided, "hostdev: strided tensors only");
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

at::Tensor as_strided(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                      std::optional<c10::SymInt> offset) {
  return at::cpu::as_strided_symint(self, size, stride, std::move(offset));
}

at::Tensor view(const at::Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

at::Tensor unfold(const at::Tensor& self, int64_t dimension, int64_t size, int64_t step) {
  return at::native::unfold(self, dimension, size, step);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
}

const at::Tensor& resize_(const at::Tensor& self, c10::SymIntArrayRef size,
                          std::optional<at::MemoryFormat> memory_format) {
  return at::native::resize_(self, C10_AS_INTARRAYREF_SLOW(size), memory_format);
}

// Copies between hostdev and CPU (either way) and within hostdev: the only way data changes device.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  at::Tensor src_host = self.device().type() == kType ? host_alias(self) : self;
  at::Tensor dst_host = dst.device().type() == kType ? host_alias(dst) : dst;
  TORCH_CHECK(src_host.is_cpu() && dst_host.is_cpu(), "hostdev: copy between ", self.device(), " and ",
              dst.device(), " is not supported");
  dst_host.copy_(src_host, non_blocking);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return copy_from(self, dst, false);
}

at::Scalar local_scalar_dense(const at::Tensor& self) { return at::native::_local_scalar_dense_cpu(self); }

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) { return at::native::set_tensor_(self, source); }
at::Tensor& set_storage(at::Tensor& self, at::Storage source) { return at::native::set_(self, source); }
at::Tensor& set_storage_offset(at::Tensor& self, at::Storage source, int64_t offset, c10::IntArrayRef size,
                               c10::IntArrayRef stride) {
  return at::cpu::set_(self, source, offset, size, stride);
}

// ----------------------------------------------------------------------------------------------- convolution
// PyTorch routes convolutions on an out-of-tree device to convolution_overrideable (whose default raises), not
// to a fallback: compute them with the CPU kernels on host aliases, after the same device checks.
at::Tensor on_host(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().type() == kType, "Expected all tensors to be on the same device, but found at least "
              "two devices, hostdev:0 and ", t.device(), "! (convolution ", what, ")");
  return host_alias(t);
}

// Contiguous, as CUDA convolutions return (the CPU kernels may pick another memory format).
at::Tensor to_device(const at::Tensor& t) { return t.defined() ? t.contiguous().to(kDevice) : t; }

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                       bool transposed, c10::IntArrayRef output_padding, int64_t groups) {
  std::optional<at::Tensor> bias_host;
  if (bias.has_value() && bias->defined()) bias_host = on_host(*bias, "bias");
  return to_device(at::convolution(on_host(input, "input"), on_host(weight, "weight"), bias_host, stride,
                                   padding, dilation, transposed, output_padding, groups));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool transposed, c10::IntArrayRef output_padding,
    int64_t groups, std::array<bool, 3> output_mask) {
  // The bias gradient has one entry per output channel (dim 0 of the weight, dim 1 when transposed).
  std::vector<int64_t> bias_sizes{weight.size(transposed ? 1 : 0) * (transposed ? groups : 1)};
  auto [gi, gw, gb] = at::convolution_backward(
      on_host(grad_output, "grad"), on_host(input, "input"), on_host(weight, "weight"), bias_sizes, stride,
      padding, dilation, transposed, output_padding, groups, output_mask);
  return {to_device(gi), to_device(gw), to_device(gb)};
}

// ----------------------------------------------------------------------------------------------- fallback
std::string describe(const c10::OperatorHandle& op) { return c10::toString(op.schema().operator_name()); }

// A tensor argument an op on hostdev may take: hostdev, or a 0-dim CPU tensor (a scalar, as CUDA allows).
void check_tensor(const c10::OperatorHandle& op, const at::Tensor& t) {
  if (!t.defined() || t.device().type() == kType) return;
  TORCH_CHECK(t.is_cpu() && t.dim() == 0, "Expected all tensors to be on the same device, but found at least "
              "two devices, hostdev:0 and ", t.device(), "! (", describe(op), " got a ", t.device(),
              " tensor of shape ", t.sizes(), ")");
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  g_fallback_calls.fetch_add(1, std::memory_order_relaxed);
  const auto nargs = op.schema().arguments().size();
  for (size_t i = 0; i < nargs; ++i) {
    c10::IValue& v = (*stack)[stack->size() - nargs + i];
    if (v.isTensor()) {
      check_tensor(op, v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) check_tensor(op, t);
    } else if (v.isOptionalTensorList()) {
      for (const std::optional<at::Tensor>& t : v.toOptionalTensorList().vec()) {
        if (t.has_value()) check_tensor(op, *t);
      }
    } else if (v.isGenerator()) {
      const at::Generator& gen = v.toGenerator();
      TORCH_CHECK(gen.device().type() == kType, "Expected a 'hostdev' device type for generator but found '",
                  gen.device().type(), "' (", describe(op), ")");
      v = c10::IValue(static_cast<Generator*>(gen.unsafeGetGeneratorImpl())->cpu_);
    }
  }
  // error_on_views: an op that returns a view must alias the input, which a copy to CPU cannot; such an op
  // needs its own kernel above instead of silently returning a copy.
  at::native::cpu_fallback(op, stack, /*error_on_views=*/true);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("unfold", unfold);
  m.impl("resize_", resize_);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("convolution_overrideable", convolution);
  m.impl("convolution_backward_overrideable", convolution_backward);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>()); }

// Ops with a CompositeExplicitAutograd kernel that out-of-tree devices get instead of the fallback, where
// that kernel cannot take inputs CUDA's and the CPU's kernels take (math_group_norm views a channels-last
// input): run the CPU kernel through the fallback, as CUDA runs its own.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("native_group_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("native_layer_norm", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

}  // namespace hostdev

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fallback_calls", [] { return hostdev::g_fallback_calls.load(); },
        "how many ops ran through the fallback (i.e. computed on hostdev) since the extension loaded");
}
