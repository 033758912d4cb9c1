// Fused attention through cuDNN's SDPA graphs (cudnn-frontend 1.32, header-only), for reel-cuda's
// `cudnn` feature (crates/cuda/src/attention.rs is the Rust side).
//
// Layouts are reel's: q, out, dq [B, Tq, H, D]; k, v, dk, dv [B, Tk, H_kv, D] (GQA: query head hh
// reads KV head hh / (H / H_kv)); bf16 storage, f32 compute. cuDNN sees them as [B, heads, T, D]
// with strides. The forward writes its softmax stats (lse = ln Σ_j exp(s·q·k_j), natural log, the
// convention of reel_kernels::attention) straight into reel's lse [B, Tq, H] f32 through the stats
// tensor's strides (honoured by cuDNN >= 9.12). The backward reads stats as packed [B, H, Tq] (cuDNN
// < 9.26 reads no other layout), so the Rust side transposes lse into that form first.
//
// Built with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: nothing from CUDA is linked. libcudnn.so.9 is
// dlopen'ed from the path the Rust side found (reel_cudnn_open); the frontend itself dlopens
// libcudart.so.13 by name, which the Rust side has loaded beforehand. Every entry point catches C++
// exceptions and reports them as a message in `err`; none throws across the C boundary.

#include <cudnn_frontend.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <unordered_map>

namespace fe = cudnn_frontend;

// With dynamic loading the application owns the libcudnn handle.
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace {

void set_err(char* err, int len, const std::string& msg) {
    if (err && len > 0) std::snprintf(err, (size_t)len, "%s", msg.c_str());
}

// Tensor uids of the graphs.
enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV };

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

// [B, heads, T, D] view of reel's [B, T, heads, D].
fe::graph::Tensor_attributes bthd(const char* name, int64_t uid, int64_t b, int64_t t, int64_t heads,
                                  int64_t d) {
    return fe::graph::Tensor_attributes()
        .set_name(name)
        .set_uid(uid)
        .set_dim({b, heads, t, d})
        .set_stride({t * heads * d, d, heads * d, 1});
}

std::shared_ptr<fe::graph::Graph> new_graph() {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

std::string build(fe::graph::Graph& g, cudnnHandle_t handle) {
    auto st = g.validate();
    if (st.is_bad()) return "validate: " + st.get_message();
    st = g.build_operation_graph(handle);
    if (st.is_bad()) return "build_operation_graph: " + st.get_message();
    st = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
    if (st.is_bad()) return "create_execution_plans: " + st.get_message();
    st = g.check_support();
    if (st.is_bad()) return "check_support: " + st.get_message();
    st = g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
    if (st.is_bad()) return "build_plans: " + st.get_message();
    return "";
}

}  // namespace

extern "C" {

// Opens libcudnn (by the given path, or by name when null) once per process; returns cuDNN's
// version (91900 for 9.19.0), or -1 with a message.
int64_t reel_cudnn_open(const char* path, char* err, int err_len) {
    try {
        if (!cudnn_frontend::cudnn_dlhandle) {
            const char* name = path ? path : "libcudnn.so.9";
            void* h = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
            if (!h) {
                const char* e = dlerror();
                set_err(err, err_len, std::string("dlopen(") + name + "): " + (e ? e : "unknown error"));
                return -1;
            }
            cudnn_frontend::cudnn_dlhandle = h;
        }
        return (int64_t)fe::detail::get_backend_version();
    } catch (std::exception const& e) {
        set_err(err, err_len, e.what());
        return -1;
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return -1;
    }
}

// A cuDNN handle whose work goes to `stream` (a CUstream); null with a message on failure.
void* reel_cudnn_handle_create(void* stream, char* err, int err_len) {
    try {
        cudnnHandle_t h = nullptr;
        auto st = fe::detail::create_handle(&h);
        if (st != CUDNN_STATUS_SUCCESS) {
            set_err(err, err_len, "cudnnCreate failed with status " + std::to_string((int)st));
            return nullptr;
        }
        st = fe::detail::set_stream(h, static_cast<cudaStream_t>(stream));
        if (st != CUDNN_STATUS_SUCCESS) {
            fe::detail::destroy_handle(h);
            set_err(err, err_len, "cudnnSetStream failed with status " + std::to_string((int)st));
            return nullptr;
        }
        return h;
    } catch (std::exception const& e) {
        set_err(err, err_len, e.what());
        return nullptr;
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return nullptr;
    }
}

void reel_cudnn_handle_destroy(void* handle) {
    try {
        if (handle) fe::detail::destroy_handle(static_cast<cudnnHandle_t>(handle));
    } catch (...) {
    }
}

// Builds the forward (backward = 0) or backward (backward = 1) graph for one shape and mask
// (causal = 1: key j is visible to query i iff j <= i, top-left aligned; 0: every key). Writes the
// workspace bytes it needs; returns null with a message when cuDNN cannot run it.
void* reel_sdpa_plan_create(void* handle, int64_t b, int64_t tq, int64_t tk, int64_t h,
                            int64_t h_kv, int64_t d, int causal, int backward,
                            int64_t* workspace_bytes, char* err, int err_len) {
    try {
        auto hd = static_cast<cudnnHandle_t>(handle);
        auto plan = std::make_unique<Plan>();
        auto g = new_graph();
        const float scale = 1.0f / std::sqrt((float)d);
        auto q = g->tensor(bthd("Q", Q, b, tq, h, d));
        auto k = g->tensor(bthd("K", K, b, tk, h_kv, d));
        auto v = g->tensor(bthd("V", V, b, tk, h_kv, d));
        if (!backward) {
            auto opts = fe::graph::SDPA_attributes()
                            .set_name("reel_sdpa_fwd")
                            .set_generate_stats(true)
                            .set_attn_scale(scale)
                            .set_causal_mask(causal != 0);
            auto [o, stats] = g->sdpa(q, k, v, opts);
            o->set_output(true).set_uid(O).set_dim({b, h, tq, d}).set_stride({tq * h * d, d, h * d, 1});
            // reel's lse [B, Tq, H] seen as [B, H, Tq, 1].
            stats->set_output(true)
                .set_uid(STATS)
                .set_data_type(fe::DataType_t::FLOAT)
                .set_dim({b, h, tq, 1})
                .set_stride({tq * h, 1, h, 1});
        } else {
            auto o = g->tensor(bthd("O", O, b, tq, h, d));
            auto dO = g->tensor(bthd("dO", DO, b, tq, h, d));
            // Packed [B, H, Tq] (see the file's comment).
            auto stats = g->tensor(fe::graph::Tensor_attributes()
                                       .set_name("stats")
                                       .set_uid(STATS)
                                       .set_dim({b, h, tq, 1})
                                       .set_stride({h * tq, tq, 1, 1})
                                       .set_data_type(fe::DataType_t::FLOAT));
            auto opts = fe::graph::SDPA_backward_attributes()
                            .set_name("reel_sdpa_bwd")
                            .set_attn_scale(scale)
                            .set_causal_mask(causal != 0);
            auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dO, stats, opts);
            dq->set_output(true).set_uid(DQ).set_dim({b, h, tq, d}).set_stride({tq * h * d, d, h * d, 1});
            dk->set_output(true).set_uid(DK).set_dim({b, h_kv, tk, d}).set_stride({tk * h_kv * d, d, h_kv * d, 1});
            dv->set_output(true).set_uid(DV).set_dim({b, h_kv, tk, d}).set_stride({tk * h_kv * d, d, h_kv * d, 1});
        }
        std::string msg = build(*g, hd);
        if (!msg.empty()) {
            set_err(err, err_len, std::string(backward ? "backward " : "forward ") + msg);
            return nullptr;
        }
        int64_t ws = 0;
        auto st = g->get_workspace_size(ws);
        if (st.is_bad()) {
            set_err(err, err_len, "get_workspace_size: " + st.get_message());
            return nullptr;
        }
        plan->graph = g;
        plan->workspace = ws;
        *workspace_bytes = ws;
        return plan.release();
    } catch (std::exception const& e) {
        set_err(err, err_len, e.what());
        return nullptr;
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return nullptr;
    }
}

void reel_sdpa_plan_destroy(void* plan) {
    try {
        delete static_cast<Plan*>(plan);
    } catch (...) {
    }
}

static int run(void* handle, void* plan, std::unordered_map<int64_t, void*>& ptrs, void* workspace,
               char* err, int err_len) {
    try {
        auto p = static_cast<Plan*>(plan);
        auto st = p->graph->execute(static_cast<cudnnHandle_t>(handle), ptrs, workspace);
        if (st.is_bad()) {
            set_err(err, err_len, "execute: " + st.get_message());
            return 1;
        }
        return 0;
    } catch (std::exception const& e) {
        set_err(err, err_len, e.what());
        return 2;
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return 2;
    }
}

// Forward: out and lse ([B, Tq, H] f32) from q, k, v. Device pointers; enqueued on the handle's stream.
int reel_sdpa_forward(void* handle, void* plan, const void* q, const void* k, const void* v, void* out,
                      float* lse, void* workspace, char* err, int err_len) {
    try {
        std::unordered_map<int64_t, void*> ptrs = {{Q, const_cast<void*>(q)},
                                                   {K, const_cast<void*>(k)},
                                                   {V, const_cast<void*>(v)},
                                                   {O, out},
                                                   {STATS, lse}};
        return run(handle, plan, ptrs, workspace, err, err_len);
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return 2;
    }
}

// Backward: dq, dk, dv (overwritten) from q, k, v, out, dout and lse as packed [B, H, Tq] f32.
int reel_sdpa_backward(void* handle, void* plan, const void* q, const void* k, const void* v,
                       const void* out, const void* dout, const float* lse_bht, void* dq, void* dk,
                       void* dv, void* workspace, char* err, int err_len) {
    try {
        std::unordered_map<int64_t, void*> ptrs = {{Q, const_cast<void*>(q)},
                                                   {K, const_cast<void*>(k)},
                                                   {V, const_cast<void*>(v)},
                                                   {O, const_cast<void*>(out)},
                                                   {DO, const_cast<void*>(dout)},
                                                   {STATS, const_cast<float*>(lse_bht)},
                                                   {DQ, dq},
                                                   {DK, dk},
                                                   {DV, dv}};
        return run(handle, plan, ptrs, workspace, err, err_len);
    } catch (...) {
        set_err(err, err_len, "unknown C++ exception");
        return 2;
    }
}

}  // extern "C"
