using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.Bench.Pairs;

/// <summary>
/// Full (unmasked) softmax attention, queries x keys, Heads query heads over KvHeads shared kv heads (1 = Gemma's MQA).
/// Ours: <see cref="Attention.Forward(in AttentionProblem)"/> on token-major [tokens, heads * dim] rows.
/// ORT: MatMul(Q, K^T) -> Mul(scale) -> Softmax -> MatMul(., V) on head-major [heads, tokens, dim] inputs with K given
/// pre-transposed, i.e. the layout that suits the three-node graph best (no Transpose nodes are timed);
/// MQA is the MatMul batch broadcast of one kv head.
/// </summary>
internal sealed unsafe class AttentionPair : KernelPair
{
    private readonly NativeBuffer _q, _k, _v, _out;
    private readonly int[] _keyStart, _keyEnd;
    private readonly int _queries, _keys, _heads, _kvHeads, _headDim;
    private readonly float _scale;

    public AttentionPair(string name, int queries, int keys, int heads, int kvHeads, int headDim) : base(name)
    {
        if (kvHeads != heads && kvHeads != 1)
            throw new ArgumentException($"kvHeads {kvHeads}: the ORT graph covers multi-head (= heads) and multi-query (1)", nameof(kvHeads));
        (_queries, _keys, _heads, _kvHeads, _headDim) = (queries, keys, heads, kvHeads, headDim);
        _scale = 1f / MathF.Sqrt(headDim);
        int qWidth = heads * headDim, kvWidth = kvHeads * headDim;
        _q = Buffer((long)queries * qWidth).FillUniform(11, 2f);
        _k = Buffer((long)keys * kvWidth).FillUniform(12, 2f);
        _v = Buffer((long)keys * kvWidth).FillUniform(13, 1f);
        _out = Buffer((long)queries * qWidth);
        _keyStart = new int[queries];
        _keyEnd = Enumerable.Repeat(keys, queries).ToArray();

        // Head-major copies for ORT.
        var q = Buffer(_q.Length);
        var kt = Buffer(_k.Length);
        var v = Buffer(_v.Length);
        var ortOut = Buffer(_out.Length);
        for (int t = 0; t < queries; t++)
            for (int h = 0; h < heads; h++)
                for (int d = 0; d < headDim; d++)
                    q.Pointer[((long)h * queries + t) * headDim + d] = _q.Pointer[(long)t * qWidth + h * headDim + d];
        for (int j = 0; j < keys; j++)
            for (int g = 0; g < kvHeads; g++)
                for (int d = 0; d < headDim; d++)
                {
                    long src = (long)j * kvWidth + g * headDim + d;
                    kt.Pointer[((long)g * headDim + d) * keys + j] = _k.Pointer[src];
                    v.Pointer[((long)g * keys + j) * headDim + d] = _v.Pointer[src];
                }

        var model = new OnnxModelBuilder();
        model.Input("q", heads, queries, headDim);
        model.Input("kt", kvHeads, headDim, keys);
        model.Input("v", kvHeads, keys, headDim);
        float scale = _scale;
        model.Initializer("scale", &scale, 1);
        model.Node("MatMul", ["q", "kt"], ["scores"]);
        model.Node("Mul", ["scores", "scale"], ["scaled"]);
        model.Node("Softmax", ["scaled"], ["probs"], OnnxAttribute.Of("axis", -1L));
        model.Node("MatMul", ["probs", "v"], ["out"]);
        model.Output("out", heads, queries, headDim);
        StartOrt(model,
            [("q", q, [heads, queries, headDim]), ("kt", kt, [kvHeads, headDim, keys]), ("v", v, [kvHeads, keys, headDim])],
            [("out", ortOut, [heads, queries, headDim])]);

        Flops = 4.0 * heads * queries * keys * headDim;
        OurBytes = 4.0 * (_q.Length * 2 + _k.Length * 2);
        OrtBytes = OurBytes;
        Note = "ORT: head-major Q/V and K^T given, scores materialised";
        Check(_out, ortOut, _out.Length, i =>
        {
            long t = i / qWidth, c = i % qWidth, h = c / headDim, d = c % headDim;
            return (h * queries + t) * headDim + d;
        });
    }

    public override void RunOurs()
    {
        var problem = new AttentionProblem
        {
            Q = _q.Span, QRowStride = _heads * _headDim, Queries = _queries,
            K = _k.Span, V = _v.Span, KvRowStride = _kvHeads * _headDim, Keys = _keys,
            Heads = _heads, KvHeads = _kvHeads, HeadDim = _headDim,
            Scale = _scale, KeyStart = _keyStart, KeyEnd = _keyEnd,
            Output = _out.Span,
        };
        Attention.Forward(problem);
    }
}
