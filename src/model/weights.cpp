#include "model/weights.h"

#include "core/error.h"
#include "io/safetensors.h"

namespace spear {

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
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
  const int64_t D = c.hidden_size;
  check(embed, "model.embed_tokens.weight", {c.vocab_size, D});
  if (static_cast<int64_t>(layers.size()) != c.num_layers)
    fail(std::to_string(layers.size()) + " layers, the config says " + std::to_string(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    check(layers[l].attn_norm, p + "input_layernorm.weight", {D});
    check(layers[l].ffn_norm, p + "post_attention_layernorm.weight", {D});
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
  check(final_norm, "model.norm.weight", {D});
  if (c.tie_word_embeddings) {
    if (!lm_head.empty()) fail("the config ties the head to the embeddings, but lm_head.weight is present");
  } else {
    check(lm_head, "lm_head.weight", {c.vocab_size, D});
  }
}

int64_t LlamaWeights::ec_count() const {
  int64_t n = 0;
  for (const LlamaLayerWeights& L : layers)
    for (const ModuleWeights& m : L.modules) n += m.ec.has_value();
  return n;
}

}  // namespace spear
