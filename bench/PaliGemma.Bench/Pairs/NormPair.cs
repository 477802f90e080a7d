using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.Bench.Pairs;

/// <summary>
/// Row-wise LayerNorm (SigLIP) or Gemma RMSNorm with its (1 + weight) scale. ORT runs LayerNormalization (opset 17) or
/// SimplifiedLayerNormalization (ORT's RMSNorm op) with the scale 1 + weight folded into the initializer, as an exporter would.
/// </summary>
internal sealed unsafe class NormPair : KernelPair
{
    private const float Eps = 1e-6f;
    private readonly NativeBuffer _x, _y, _gamma, _beta;
    private readonly int _rows, _dim;
    private readonly bool _rms;

    public NormPair(string name, int rows, int dim, bool rms) : base(name)
    {
        (_rows, _dim, _rms) = (rows, dim, rms);
        _x = Buffer((long)rows * dim).FillUniform(21, 3f);
        _y = Buffer(_x.Length);
        _gamma = Buffer(dim).FillUniform(22, 0.5f);
        _beta = Buffer(dim).FillUniform(23, 0.5f);
        var ortY = Buffer(_x.Length);

        var model = new OnnxModelBuilder();
        model.Input("x", rows, dim);
        if (rms)
        {
            var scale = Buffer(dim);
            for (int i = 0; i < dim; i++)
                scale.Pointer[i] = 1f + _gamma.Pointer[i];
            model.Initializer("scale", scale.Pointer, dim, dim);
            model.Node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], OnnxAttribute.Of("axis", -1L), OnnxAttribute.Of("epsilon", Eps));
        }
        else
        {
            model.Initializer("gamma", _gamma.Pointer, dim, dim);
            model.Initializer("beta", _beta.Pointer, dim, dim);
            model.Node("LayerNormalization", ["x", "gamma", "beta"], ["y"], OnnxAttribute.Of("axis", -1L), OnnxAttribute.Of("epsilon", Eps));
        }
        model.Output("y", rows, dim);
        StartOrt(model, [("x", _x, [rows, dim])], [("y", ortY, [rows, dim])]);

        OurBytes = OrtBytes = 8.0 * rows * dim;
        Note = rms ? "ORT: SimplifiedLayerNormalization, scale = 1 + w" : "ORT: LayerNormalization";
        Check(_y, ortY, _x.Length);
    }

    public override void RunOurs()
    {
        if (_rms)
            Norms.RmsNorm(_x.Span, _y.Span, _rows, _dim, _gamma.Span, Eps, unitOffset: true);
        else
            Norms.LayerNorm(_x.Span, _y.Span, _rows, _dim, _gamma.Span, _beta.Span, Eps);
    }
}
