using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using PaliGemma.Bench.Onnx;

namespace PaliGemma.Bench.Quant;

/// <summary>
/// ONNX Runtime's com.microsoft <c>MatMulNBits</c> (4-bit, block 32, accuracy_level left at its default) as a one-node
/// graph: y [M, N] = x [M, K] · dequant(B)ᵀ with B a constant initializer (so ORT pre-packs it), dequant(q) = (q - 8) · scale
/// (no zero-point input: ORT's default zero point for 4 bits is 8). Codes are packed low nibble first along K.
/// </summary>
internal sealed unsafe class MatMulNBitsRunner : IDisposable
{
    public const int BlockSize = 32;

    private readonly InferenceSession _session;
    private readonly RunOptions _runOptions = new();
    private readonly OrtValue _input, _output;
    private readonly string[] _inputNames = ["x"], _outputNames = ["y"];

    /// <summary>The codes (N, blocks, 16 bytes) and scales (N, blocks) the graph holds; <see cref="Dequantize"/> widens them back.</summary>
    public byte[] Codes { get; }
    public float[] Scales { get; }
    public int Rows { get; }
    public int K { get; }
    public int N { get; }

    public MatMulNBitsRunner(float* weights, int n, int k, int rows, NativeBuffer x, NativeBuffer y)
    {
        (Rows, K, N) = (rows, k, n);
        int blocks = (k + BlockSize - 1) / BlockSize;
        Codes = new byte[(long)n * blocks * BlockSize / 2];
        Scales = new float[(long)n * blocks];
        Quantize(weights, n, k, Codes, Scales);
        _session = new InferenceSession(BuildModel(n, k, blocks), Options());
        _input = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, [rows, k], (nint)x.Pointer, (long)rows * k * sizeof(float));
        _output = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, [rows, n], (nint)y.Pointer, (long)rows * n * sizeof(float));
    }

    public void Run() => _session.Run(_runOptions, _inputNames, [_input], _outputNames, [_output]);

    /// <summary>
    /// Symmetric 4-bit blocks as ORT's own quantizer makes them: the element of largest magnitude a sets scale = a / -8,
    /// so it maps to code 0 exactly; q = clamp(round(w / scale) + 8, 0, 15).
    /// </summary>
    private static void Quantize(float* weights, int n, int k, byte[] codes, float[] scales)
    {
        int blocks = (k + BlockSize - 1) / BlockSize;
        for (int r = 0; r < n; r++)
        {
            for (int b = 0; b < blocks; b++)
            {
                float extreme = 0f;
                int end = Math.Min(k, (b + 1) * BlockSize);
                for (int i = b * BlockSize; i < end; i++)
                {
                    float v = weights[(long)r * k + i];
                    if (Math.Abs(v) > Math.Abs(extreme)) extreme = v;
                }
                float scale = extreme / -8f;
                float inverse = scale == 0f ? 0f : 1f / scale;
                scales[(long)r * blocks + b] = scale;
                long blob = ((long)r * blocks + b) * (BlockSize / 2);
                for (int j = 0; j < BlockSize; j++)
                {
                    int i = b * BlockSize + j;
                    int q = i < k ? Math.Clamp((int)MathF.Round(weights[(long)r * k + i] * inverse) + 8, 0, 15) : 8;
                    codes[blob + j / 2] |= (byte)(j % 2 == 0 ? q : q << 4);
                }
            }
        }
    }

    /// <summary>Row <paramref name="row"/> of the weights ORT multiplies by: (q - 8) · scale.</summary>
    public void Dequantize(int row, Span<float> destination)
    {
        int blocks = (K + BlockSize - 1) / BlockSize;
        for (int i = 0; i < K; i++)
        {
            int b = i / BlockSize, j = i % BlockSize;
            byte packed = Codes[((long)row * blocks + b) * (BlockSize / 2) + j / 2];
            int q = j % 2 == 0 ? packed & 0xF : packed >> 4;
            destination[i] = (q - 8) * Scales[(long)row * blocks + b];
        }
    }

    private static SessionOptions Options() => new()
    {
        IntraOpNumThreads = OrtRunner.Threads,
        InterOpNumThreads = 1,
        ExecutionMode = ExecutionMode.ORT_SEQUENTIAL,
        GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
    };

    /// <summary>The ModelProto bytes (field numbers of onnx/onnx.proto), written with the bench's <see cref="ProtoWriter"/>.</summary>
    private byte[] BuildModel(int n, int k, int blocks)
    {
        const int ElemFloat = 1, ElemUint8 = 2, AttrInt = 2;
        var model = new ProtoWriter();
        model.Int64(1, 8);                                                          // ir_version
        model.String(2, "PaliGemma.Bench");
        model.Message(8, o => { o.String(1, ""); o.Int64(2, 17); });                // opset_import: default domain
        model.Message(8, o => { o.String(1, "com.microsoft"); o.Int64(2, 1); });   // and the contrib ops
        model.Message(7, graph =>
        {
            graph.Message(1, node =>
            {
                node.String(1, "x"); node.String(1, "B"); node.String(1, "scales");
                node.String(2, "y");
                node.String(3, "MatMulNBits_0");
                node.String(4, "MatMulNBits");
                foreach (var (name, value) in new[] { ("K", (long)k), ("N", (long)n), ("bits", 4L), ("block_size", (long)BlockSize) })
                    node.Message(5, a => { a.String(1, name); a.Int64(3, value); a.Int64(20, AttrInt); });
                node.String(7, "com.microsoft");
            });
            graph.String(2, "matmulnbits");
            graph.Message(5, t =>
            {
                t.Int64(1, n); t.Int64(1, blocks); t.Int64(1, BlockSize / 2);
                t.Int64(2, ElemUint8);
                t.String(8, "B");
                t.Bytes(9, Codes);
            });
            graph.Message(5, t =>
            {
                t.Int64(1, n); t.Int64(1, blocks);
                t.Int64(2, ElemFloat);
                t.String(8, "scales");
                t.Bytes(9, System.Runtime.InteropServices.MemoryMarshal.AsBytes(Scales.AsSpan()));
            });
            graph.Message(11, v => ValueInfo(v, "x", Rows, k));
            graph.Message(12, v => ValueInfo(v, "y", Rows, n));
        });
        return model.ToArray();

        static void ValueInfo(ProtoWriter v, string name, long rows, long cols)
        {
            v.String(1, name);
            v.Message(2, type => type.Message(1, tensor =>
            {
                tensor.Int64(1, ElemFloat);
                tensor.Message(2, shape =>
                {
                    shape.Message(1, d => d.Int64(1, rows));
                    shape.Message(1, d => d.Int64(1, cols));
                });
            }));
        }
    }

    public void Dispose()
    {
        _input.Dispose();
        _output.Dispose();
        _runOptions.Dispose();
        _session.Dispose();
    }
}
