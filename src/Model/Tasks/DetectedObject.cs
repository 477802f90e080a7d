namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>
/// One object from a detect or segment output: <c>&lt;loc y1&gt;&lt;loc x1&gt;&lt;loc y2&gt;&lt;loc x2&gt;</c>, optionally 16
/// <c>&lt;segNNN&gt;</c> mask codes, and a label. Boxes follow big_vision's evaluator: normalized = token / 1023, pixels =
/// normalized * size of the original image (as doubles); the /1024 convention of the public demo is given as well.
/// </summary>
public sealed class DetectedObject
{
    internal DetectedObject(string label, int[] loc, int[]? seg, int imageWidth, int imageHeight)
    {
        Label = label;
        _loc = loc;
        Seg = seg;
        ImageWidth = imageWidth;
        ImageHeight = imageHeight;
    }

    /// <summary>Text after the box up to ';', '&lt;', '&gt;' or the end, trimmed; "" when the model gave none.</summary>
    public string Label { get; }

    /// <summary>The four location tokens in the model's order y1, x1, y2, x2 (0..1023).</summary>
    public IReadOnlyList<int> LocY1X1Y2X2 => _loc;

    private readonly int[] _loc;

    /// <summary>The 16 mask codes (0..127) of a segment output, or null for a detection.</summary>
    public IReadOnlyList<int>? Seg { get; }

    public bool HasSegmentation => Seg is not null;

    public int ImageWidth { get; }
    public int ImageHeight { get; }

    /// <summary>y1, x1, y2, x2 as token / 1023.</summary>
    public double[] NormalizedY1X1Y2X2 => Map(1023.0, 1, 1);

    /// <summary>y1, x1, y2, x2 as token / 1024 (public demo and fine-tune colab).</summary>
    public double[] NormalizedY1X1Y2X2Div1024 => Map(1024.0, 1, 1);

    /// <summary>x1, y1, x2, y2 in pixels of the original image: (token / 1023.0) * size.</summary>
    public double[] BoxXyxy => ToXyxy(Map(1023.0, ImageHeight, ImageWidth));

    /// <summary>x1, y1, x2, y2 in pixels with the /1024 convention.</summary>
    public double[] BoxXyxyDiv1024 => ToXyxy(Map(1024.0, ImageHeight, ImageWidth));

    /// <summary>
    /// Integer pixel box where big_vision pastes the mask: int((token / 1023.0) * size); null when it collapses (x2 &lt;= x1 or
    /// y2 &lt;= y1 after truncation).
    /// </summary>
    public PixelBox? MaskPixelBox => MaskPlacement.PixelBoxOf(_loc, ImageWidth, ImageHeight);

    /// <summary>The full-image mask [ImageHeight * ImageWidth], 1 inside the object, once decoded; null otherwise.</summary>
    public byte[]? Mask { get; internal set; }

    /// <summary>Attaches a full-image mask (1 = object) decoded elsewhere, e.g. by a caller-owned <see cref="MaskDecoder"/>.</summary>
    /// <exception cref="ArgumentException">The mask is not ImageHeight * ImageWidth bytes.</exception>
    public void SetMask(byte[]? mask)
    {
        if (mask is not null && mask.Length != ImageWidth * ImageHeight)
            throw new ArgumentException($"the mask holds {mask.Length} bytes, the {ImageWidth}x{ImageHeight} image needs {ImageWidth * ImageHeight}", nameof(mask));
        Mask = mask;
    }

    public override string ToString()
    {
        var b = BoxXyxy;
        return FormattableString.Invariant($"{(Label.Length == 0 ? "(no label)" : Label)}: x1={b[0]:F1} y1={b[1]:F1} x2={b[2]:F1} y2={b[3]:F1}");
    }

    private double[] Map(double divisor, double height, double width)
    {
        var loc = _loc;
        return [loc[0] / divisor * height, loc[1] / divisor * width, loc[2] / divisor * height, loc[3] / divisor * width];
    }

    private static double[] ToXyxy(double[] y1x1y2x2) => [y1x1y2x2[1], y1x1y2x2[0], y1x1y2x2[3], y1x1y2x2[2]];
}
