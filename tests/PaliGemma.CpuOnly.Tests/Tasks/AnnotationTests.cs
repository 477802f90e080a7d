using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.CpuOnly.Tests.Tasks;

public sealed class AnnotationTests
{
    [Fact]
    public void Rle_is_column_major_starting_with_zeros_and_round_trips()
    {
        // 3 wide, 2 high, row-major:  0 1 1 / 0 0 1  -> columns: (0,0) (1,0) (1,1) -> 0 0 1 0 1 1
        byte[] mask = [0, 1, 1, 0, 0, 1];
        var counts = MaskRle.Encode(mask, 3, 2);
        Assert.Equal(new[] { 2, 1, 1, 2 }, counts);
        Assert.Equal(mask, MaskRle.Decode(counts, 3, 2));
        Assert.Equal(new[] { 0, 4 }, MaskRle.Encode([1, 1, 1, 1], 2, 2));

        var random = new Random(5);
        var big = new byte[37 * 23];
        for (int i = 0; i < big.Length; i++) big[i] = (byte)(random.Next(3) == 0 ? 1 : 0);
        var bigCounts = MaskRle.Encode(big, 37, 23);
        Assert.Equal(big.Length, bigCounts.Sum());
        Assert.Equal(big, MaskRle.Decode(bigCounts, 37, 23));
    }

    [Fact]
    public void Draw_outlines_the_box_tints_the_mask_and_leaves_the_input_alone()
    {
        const int w = 200, h = 100;
        var image = Gray(w, h, 100);
        // x from 0.25 to 0.75 of the width, y from 0.5 to 1023/1023 of the height.
        var o = Assert.Single(OutputParser.Parse("<loc0512><loc0256><loc1023><loc0767> thing", w, h));
        var mask = new byte[w * h];
        for (int y = 70; y < 90; y++) for (int x = 80; x < 120; x++) mask[y * w + x] = 1;
        o.SetMask(mask);

        var annotated = ResultAnnotator.Draw(image, [o]);
        Assert.All(image.Pixels, p => Assert.Equal(100, p));
        var color = ResultAnnotator.ColorOf(0);
        var box = o.BoxXyxy;
        int x1 = (int)Math.Floor(box[0]), y2 = (int)Math.Ceiling(box[3]) - 1;
        Assert.Equal(color, Pixel(annotated, x1, 80));
        Assert.Equal(color, Pixel(annotated, x1 + 1, 80));
        Assert.Equal((100, 100, 100), Pixel(annotated, x1 + 2, 80)); // 2-pixel outline only
        Assert.Equal(color, Pixel(annotated, 100, y2));

        // Inside the mask: blended towards the colour; inside the box but outside the mask: untouched.
        var tinted = Pixel(annotated, 100, 80);
        Assert.Equal(Blend(100, color.R), tinted.R);
        Assert.Equal(Blend(100, color.G), tinted.G);
        Assert.Equal(Blend(100, color.B), tinted.B);
        Assert.Equal((100, 100, 100), Pixel(annotated, 70, 60));
        Assert.Equal((100, 100, 100), Pixel(annotated, 10, 10));

        // The label tag sits above the box and holds both tag colour and ink.
        int tagTop = (int)Math.Floor(box[1]) - 9;
        var tagPixels = Enumerable.Range(x1, 6 * 5).SelectMany(x => Enumerable.Range(tagTop, 9).Select(y => Pixel(annotated, x, y))).ToHashSet();
        Assert.Contains(color, tagPixels);
        Assert.Contains((255, 255, 255), tagPixels.Select(p => ((int)p.R, (int)p.G, (int)p.B)));
    }

    [Fact]
    public void Draw_clips_labels_and_boxes_at_the_image_edge_and_checks_the_size()
    {
        var image = Gray(20, 10, 0);
        var objects = OutputParser.Parse("<loc0000><loc0000><loc1023><loc1023> a very long label that does not fit ; <loc0000><loc1000><loc1023><loc1023> 猫", 20, 10);
        var annotated = ResultAnnotator.Draw(image, objects);
        Assert.Equal(image.Pixels.Length, annotated.Pixels.Length);
        Assert.Throws<ArgumentException>(() => ResultAnnotator.Draw(Gray(21, 10, 0), objects));
    }

    [Fact]
    public void SavePng_writes_a_png_of_the_image_size()
    {
        string path = Path.Combine(Path.GetTempPath(), $"pg-annot-{Guid.NewGuid():N}.png");
        try
        {
            var image = Gray(31, 17, 7);
            image.Pixels[0] = 255;
            ResultAnnotator.SavePng(image, path);
            var back = ImageLoader.Load(path);
            Assert.Equal((31, 17), (back.Width, back.Height));
            Assert.Equal(image.Pixels, back.Pixels);
        }
        finally
        {
            File.Delete(path);
        }
    }

    internal static RgbImage Gray(int w, int h, byte value)
    {
        var px = new byte[w * h * 3];
        Array.Fill(px, value);
        return new RgbImage(w, h, px);
    }

    internal static (byte R, byte G, byte B) Pixel(RgbImage image, int x, int y)
    {
        int p = (y * image.Width + x) * 3;
        return (image.Pixels[p], image.Pixels[p + 1], image.Pixels[p + 2]);
    }

    private static byte Blend(byte under, byte over) => (byte)Math.Round(under + (over - under) * ResultAnnotator.MaskAlpha);
}
