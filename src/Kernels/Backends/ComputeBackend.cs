namespace PaliGemma.CpuOnly.Kernels.Backends;

/// <summary>
/// Where the model's heavy operations run. The model keeps its activations, weights and KV cache in buffers of the
/// backend and calls these operations on them, so a device backend moves data across the bus only when the model asks
/// (inputs in, logits and hidden states out), never between two operations.
/// </summary>
/// <remarks>
/// Operations are ordered: each sees the results of the ones issued before it on the same backend (a device backend may
/// queue them; <see cref="Read"/> waits for everything issued so far). One backend instance serves one thread at a time,
/// the same rule as the model's sessions. The CPU backend (<see cref="CpuBackend.Instance"/>) runs each operation on the
/// calling thread with the library's SIMD kernels.
/// </remarks>
public interface IComputeBackend
{
    /// <summary>What computes, for messages: "cpu (Vector512, 2 threads)", "cuda: NVIDIA H100 80GB HBM3", ...</summary>
    string Name { get; }

    /// <summary>True when buffers live in host memory (<see cref="DeviceSpan.HostSpan"/> works).</summary>
    bool IsHost { get; }

    /// <summary>A zero-filled buffer of <paramref name="length"/> floats.</summary>
    DeviceBuffer Allocate(long length);

    /// <summary>Copies host floats into a buffer range of the same length.</summary>
    void Write(ReadOnlySpan<float> source, DeviceSpan destination);

    /// <summary>Copies a buffer range to host memory, after every operation issued before it.</summary>
    void Read(DeviceSpan source, Span<float> destination);

    /// <summary>
    /// Makes a weight matrix [N, K] (with an optional bias of N floats) resident. Called once per layer at load: a device
    /// backend copies the stored bytes (bf16, f16, f32, or a block-quantized layout it knows) and converts in its kernels.
    /// </summary>
    ResidentMatrix Upload(IMatrixOperand weight, ReadOnlySpan<float> bias);

    /// <summary>y[rows, N] = x[rows, K]·Wᵀ + b; with <paramref name="outputSoftCap"/> &gt; 0, y = cap·tanh(y / cap).</summary>
    void MatMul(DeviceSpan x, int rows, ResidentMatrix weight, DeviceSpan y, float outputSoftCap = 0f);

    /// <summary>
    /// outputs[i][rows, N_i] = x[rows, K]·W_iᵀ + b_i for every weight (all of the same K): several products of one input,
    /// such as a layer's query, key and value projections. The results are those of one <see cref="MatMul"/> per weight,
    /// bit for bit; a backend may run them together (the CPU backend codes a quantized token once and runs every
    /// matrix's rows in one parallel batch). The default issues one <see cref="MatMul"/> per weight.
    /// </summary>
    void MatMulSameInput(DeviceSpan x, int rows, ReadOnlySpan<ResidentMatrix> weights, ReadOnlySpan<DeviceSpan> outputs)
    {
        SameInputProducts.Check(rows, weights, outputs);
        for (int i = 0; i < weights.Length; i++)
            MatMul(x, rows, weights[i], outputs[i]);
    }

    void Copy(DeviceSpan source, DeviceSpan destination);

    /// <summary>destination = a + b, elementwise (destination may be a or b).</summary>
    void Add(DeviceSpan a, DeviceSpan b, DeviceSpan destination);

    /// <summary>destination = x · factor, elementwise.</summary>
    void Scale(DeviceSpan x, float factor, DeviceSpan destination);

    /// <summary>y = gelu_tanh(x), elementwise.</summary>
    void GeluTanh(DeviceSpan x, DeviceSpan y);

    /// <summary>y = gelu_tanh(gate) · up, elementwise (GeGLU).</summary>
    void GeluTanhMul(DeviceSpan gate, DeviceSpan up, DeviceSpan y);

    /// <summary>Row-wise RMSNorm over <paramref name="dim"/> floats: y = x / rms(x) · (w or 1 + w).</summary>
    void RmsNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan weight, float eps, bool unitOffset);

    /// <summary>Row-wise LayerNorm over <paramref name="dim"/> floats: y = (x - mean) / sqrt(var + eps) · gamma + beta.</summary>
    void LayerNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan gamma, DeviceSpan beta, float eps);

    /// <summary>Rotary embedding (rotate-half) in place on <paramref name="heads"/> heads of each row, row r at position positions[r].</summary>
    void Rope(DeviceSpan x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta);

    /// <summary>Scaled dot-product attention with per-query key ranges and a key padding mask (see <see cref="AttentionProblem"/>).</summary>
    void Attention(scoped in DeviceAttentionProblem problem);
}

/// <summary>
/// <see cref="AttentionProblem"/> over backend buffers. The per-query key ranges and the key mask are small host arrays;
/// a device backend copies them with the call.
/// </summary>
public ref struct DeviceAttentionProblem
{
    public DeviceSpan Q;
    public int QRowStride;
    public int Queries;
    public DeviceSpan K;
    public DeviceSpan V;
    public int KvRowStride;
    public int Keys;
    public int Heads;
    public int KvHeads;
    public int HeadDim;
    public float Scale;
    public float LogitSoftCap;
    public ReadOnlySpan<int> KeyStart;
    public ReadOnlySpan<int> KeyEnd;
    public ReadOnlySpan<byte> KeyValid;
    /// <summary>[Queries, Heads · HeadDim], contiguous.</summary>
    public DeviceSpan Output;
}
