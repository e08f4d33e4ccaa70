#include "model/weights.h"

#include <algorithm>

#include "core/error.h"
#include "io/safetensors.h"

namespace spear {

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

}  // namespace

WeightTensor WeightTensor::owned(DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  SPEAR_CHECK(static_cast<int64_t>(bytes.size()) ==
                  numel_of(shape) * static_cast<int64_t>(dtype_size(dtype)),
              "tensor bytes do not match its shape " + shape_str(shape));
  auto store = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  WeightTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data = store->data();
  t.nbytes = store->size();
  t.owner = std::move(store);
  return t;
}

WeightTensor WeightTensor::from_f32(std::vector<int64_t> shape, std::vector<float> values) {
  SPEAR_CHECK(static_cast<int64_t>(values.size()) == numel_of(shape),
              "tensor values do not match its shape " + shape_str(shape));
  auto store = std::make_shared<std::vector<float>>(std::move(values));
  WeightTensor t;
  t.dtype = DType::F32;
  t.shape = std::move(shape);
  t.data = reinterpret_cast<const uint8_t*>(store->data());
  t.nbytes = store->size() * sizeof(float);
  t.owner = std::move(store);
  return t;
}

WeightTensor WeightTensor::view(DType dtype, std::vector<int64_t> shape, const uint8_t* bytes,
                                std::shared_ptr<const void> owner) {
  WeightTensor t;
  t.dtype = dtype;
  t.nbytes = static_cast<size_t>(numel_of(shape)) * dtype_size(dtype);
  t.shape = std::move(shape);
  t.data = bytes;
  t.owner = std::move(owner);
  return t;
}

int64_t WeightTensor::numel() const { return numel_of(shape); }

void WeightTensor::release() const {
  if (mapping && data) mapping->release(data, nbytes);
}

void WeightTensor::to_f32(float* out) const {
  TensorView v;
  v.dtype = dtype;
  v.shape = shape;
  v.data = data;
  v.nbytes = nbytes;
  ::spear::to_f32(v, out);
}

std::vector<float> WeightTensor::to_f32() const {
  std::vector<float> r(static_cast<size_t>(numel()));
  to_f32(r.data());
  return r;
}

namespace {

template <class T, class W>
std::vector<NamedTensor<T>> named_unquantized(W& w) {
  const ModelConfig& c = w.config;
  const int64_t D = c.hidden_size;
  SPEAR_CHECK(static_cast<int64_t>(w.layers.size()) == c.num_layers,
              std::to_string(w.layers.size()) + " layers, the config says " + std::to_string(c.num_layers));
  std::vector<NamedTensor<T>> r;
  r.push_back({"model.embed_tokens.weight", &w.embed, {c.vocab_size, D}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    r.push_back({p + "input_layernorm.weight", &w.layers[l].attn_norm, {D}});
    r.push_back({p + "post_attention_layernorm.weight", &w.layers[l].ffn_norm, {D}});
  }
  r.push_back({"model.norm.weight", &w.final_norm, {D}});
  if (!c.tie_word_embeddings) r.push_back({"lm_head.weight", &w.lm_head, {c.vocab_size, D}});
  return r;
}

}  // namespace

std::vector<NamedTensor<WeightTensor>> unquantized_tensors(LlamaWeights& w) {
  return named_unquantized<WeightTensor>(w);
}

std::vector<NamedTensor<const WeightTensor>> unquantized_tensors(const LlamaWeights& w) {
  return named_unquantized<const WeightTensor>(w);
}

void LlamaWeights::validate(const std::string& label) const {
  const ModelConfig& c = config;
  auto fail = [&](const std::string& why) { throw Error(label + ": " + why); };
  auto check = [&](const WeightTensor& t, const std::string& name, const std::vector<int64_t>& shape) {
    if (t.empty()) fail("missing tensor '" + name + "'");
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
      fail("tensor '" + name + "' has dtype " + std::string(dtype_name(t.dtype)) +
           "; expected F32, F16 or BF16");
    if (t.shape != shape)
      fail("tensor '" + name + "' has shape " + shape_str(t.shape) + ", config.json implies " +
           shape_str(shape));
    if (t.nbytes != static_cast<size_t>(numel_of(shape)) * dtype_size(t.dtype))
      fail("tensor '" + name + "' has the wrong byte size");
  };
  if (static_cast<int64_t>(layers.size()) != c.num_layers)
    fail(std::to_string(layers.size()) + " layers, the config says " + std::to_string(c.num_layers));
  for (const auto& t : unquantized_tensors(*this)) check(*t.tensor, t.name, t.shape);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (Module m : kAllModules) {
      const ModuleWeights& mw = at(l, m);
      const ModuleShape s = module_shape(c, m);
      const std::string name = p + std::string(module_name(m));
      if (mw.quant) {
        if (!mw.dense.empty()) fail(name + ": both dense and quantized weights");
        if (mw.quant->N != s.out || mw.quant->K != s.in)
          fail(name + ": quantized shape (" + std::to_string(mw.quant->N) + ", " +
               std::to_string(mw.quant->K) + ") does not match the config's (" +
               std::to_string(s.out) + ", " + std::to_string(s.in) + ")");
      } else {
        check(mw.dense, name + ".weight", {s.out, s.in});
        if (mw.ec) fail(name + ": an Error Compensator on a full-precision module");
      }
      if (mw.ec && (mw.ec->in != s.in || mw.ec->out != s.out))
        fail(name + ".ec: shape does not match the module");
    }
  }
  if (c.tie_word_embeddings && !lm_head.empty())
    fail("the config ties the head to the embeddings, but lm_head.weight is present");
}

int64_t LlamaWeights::ec_count() const {
  int64_t n = 0;
  for (const LlamaLayerWeights& L : layers)
    for (const ModuleWeights& m : L.modules) n += m.ec.has_value();
  return n;
}

std::optional<ModuleWeights> stack_modules(const LlamaWeights& w, int64_t layer, const std::vector<Module>& ms,
                                           int64_t max_rank, std::string* why) {
  auto no = [&](const std::string& reason) -> std::optional<ModuleWeights> {
    if (why) *why = reason;
    return std::nullopt;
  };
  SPEAR_CHECK(!ms.empty(), "stack_modules: no modules");
  const ModelConfig& c = w.config;
  const ModuleWeights& first = w.at(layer, ms[0]);
  const int64_t K = module_shape(c, ms[0]).in;
  int64_t N = 0, R = 0;
  bool gated = false;
  for (Module m : ms) {
    const ModuleWeights& mw = w.at(layer, m);
    if (module_input(m) != module_input(ms[0])) return no("the modules read different inputs");
    if (mw.quantized() != first.quantized()) return no("some are quantized, some not");
    if (mw.quant) {
      const QuantScheme &a = mw.quant->scheme, &b = first.quant->scheme;
      if (a.bits != b.bits || a.group != b.group || a.symmetric != b.symmetric) return no("quantization schemes differ");
    } else if (mw.dense.dtype != first.dense.dtype) {
      return no("dtypes differ");
    }
    N += module_shape(c, m).out;
    if (mw.ec) {
      R += mw.ec->rank;
      gated = gated || mw.ec->gated;
    }
  }
  if (R > max_rank) return no("stacked EC rank " + std::to_string(R) + " > " + std::to_string(max_rank));
  ModuleWeights out;
  if (first.quant) {
    QuantizedMatrix& q = out.quant.emplace();
    q.N = N;
    q.K = K;
    q.scheme = first.quant->scheme;
    for (Module m : ms) {  // rows, then their per-row scales and zeros: (N, groups) row-major
      const QuantizedMatrix& p = *w.at(layer, m).quant;
      q.codes.insert(q.codes.end(), p.codes.begin(), p.codes.end());
      q.scales.insert(q.scales.end(), p.scales.begin(), p.scales.end());
      q.zeros.insert(q.zeros.end(), p.zeros.begin(), p.zeros.end());
    }
  } else {
    std::vector<uint8_t> bytes;
    for (Module m : ms) {
      const WeightTensor& t = w.at(layer, m).dense;
      bytes.insert(bytes.end(), t.data, t.data + t.nbytes);
    }
    out.dense = WeightTensor::owned(first.dense.dtype, {N, K}, std::move(bytes));
  }
  if (R > 0) {
    ECParams& e = out.ec.emplace();
    e.in = K;
    e.out = N;
    e.rank = R;
    e.gated = gated;
    e.A.assign(R * K, 0.0f);
    e.B.assign(N * R, 0.0f);
    if (gated) {
      e.G.assign(R * R, 0.0f);
      e.c.assign(R, 0.0f);
    }
    int64_t n0 = 0, r0 = 0;  // where this member's rows and rank coordinates start
    for (Module m : ms) {
      const int64_t n = module_shape(c, m).out;
      if (const auto& p = w.at(layer, m).ec) {
        const int64_t r = p->rank;
        std::copy(p->A.begin(), p->A.end(), e.A.begin() + r0 * K);
        for (int64_t i = 0; i < n; ++i)
          std::copy_n(&p->B[i * r], r, &e.B[(n0 + i) * R + r0]);
        if (p->gated) {
          for (int64_t i = 0; i < r; ++i) std::copy_n(&p->G[i * r], r, &e.G[(r0 + i) * R + r0]);
          std::copy(p->c.begin(), p->c.end(), e.c.begin() + r0);
        }
        r0 += r;
      }
      n0 += n;
    }
  }
  return out;
}

}  // namespace spear
